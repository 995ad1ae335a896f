"""Cost against cohort size: every stage that reads all discs, and the extraction stream.

--discs N,...: a discs table of about N rows is written directly (no images): the reference discs
of a small synthetic cohort, cut and measured by the extraction's own code, repeated under new
patient ids, with their gradings. The bottleneck sweep (one bottleneck, --epochs epochs), the
encoding and the classification then run on it through the functions the job's stages call.
--series N,...: the extraction stream over synthetic cohorts of N series, with the segmenter of
a finished `make demo` (or --checkpoint).

Each run prints, per size and stage: wall time, time per disc (per series; per disc-epoch for the
sweep), the driver's peak resident memory, and the largest one Ray worker reached. The tables
are written by Ray tasks, and each stage at each size runs in a fresh driver process joined to
the same Ray, so a driver's memory is that stage's alone. What must hold: the driver's peak
stays flat whatever the size (no stage gathers the cohort on it), and the time per disc stays
flat (no stage costs more per disc as the cohort grows).

    python bench/scale.py [--discs 1000,5000,20000,50000] [--series 64,256] [--epochs 2]
                          [--checkpoint RUN/checkpoint_...] [--json PATH]

Writes bench/results/scale.json (or --json): one record per size and stage.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402, I001  (sets Ray's environment: import it before ray)

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.analysis.classify import run_classification  # noqa: E402
from pipeline.data import storage, tables, volumes  # noqa: E402
from pipeline.data.cohort import catalog  # noqa: E402
from pipeline.data.synthetic import synthesize  # noqa: E402
from pipeline.discs import isolate  # noqa: E402
from pipeline.segmentation import stream  # noqa: E402
from pipeline.shape.encode import encode_discs  # noqa: E402
from pipeline.shape.train import count_training_discs  # noqa: E402
from tune.bottleneck_sweep import run_sweep  # noqa: E402

TEMPLATE_PATIENTS = 12
STAGES = ("sweep", "encode", "classify")


def template(cfg: config.Config, folder: str, patients: int = TEMPLATE_PATIENTS
             ) -> tuple[list[pa.Table], pd.DataFrame]:
    """One disc table per series of a small synthetic cohort (its reference discs, measured and
    cubed by the extraction's code) and the cohort's gradings."""
    synthesize(folder, patients=patients, seed=5, sequences=(cfg.sequence,))
    found = catalog(folder, cfg.sequence, val_fraction=cfg.segmentation.val_fraction,
                    seed=cfg.seed)
    per_series = []
    for row in found.series.to_dict("records"):
        mask = volumes.read_volume(row["mask_uri"])
        skipped: list[str] = []
        rows, cubes = stream.disc_rows(isolate.reference_discs(mask.array), "reference",
                                       {**row, "fold": 0}, mask.array, mask.spacing, cfg, skipped)
        per_series.append(stream.disc_table(rows, cubes, cfg.discs.cube_size))
    return per_series, found.gradings


def write_discs(per_series: list[pa.Table], gradings: pd.DataFrame, n_discs: int,
                out: str) -> int:
    """The template's series repeated under new patient ids until about n_discs rows are
    written, one file per series as extraction writes them; gradings follow their patients.
    Returns the rows written."""
    written, copy, graded = 0, 0, []
    while written < n_discs:
        for table in per_series:
            patient = table.column("patient_id")[0].as_py()
            new = f"{copy}x{patient}"
            series_id = f"{new}_{table.column('series_id')[0].as_py().split('_', 1)[1]}"
            table = table.set_column(table.schema.get_field_index("patient_id"), "patient_id",
                                     pa.array([new] * table.num_rows))
            table = table.set_column(table.schema.get_field_index("series_id"), "series_id",
                                     pa.array([series_id] * table.num_rows))
            storage.write_table(table, stream.disc_table_path(out, series_id))
            graded.append(gradings[gradings.patient_id == patient].assign(patient_id=new))
            written += table.num_rows
            if written >= n_discs:
                break
        copy += 1
    storage.write_table(pd.concat(graded, ignore_index=True), tables.path(out, tables.GRADINGS))
    return written


def measured(stage: str, size_key: str, size: int, units: int, unit: str, run) -> dict:
    """Run `run()`, timing it and taking the driver's and the largest worker's peak memory."""
    before = common.rss_mib()
    exact = common.reset_peak_rss()
    with common.WorkerPeakRss() as workers:
        started = time.perf_counter()
        run()
        wall_s = time.perf_counter() - started
    record = {size_key: size, "stage": stage, "wall_s": round(wall_s, 2),
              f"ms_per_{unit}": round(1000 * wall_s / units, 3),
              "driver_rss_before_mib": round(before, 1),
              "driver_peak_rss_mib": round(common.peak_rss_mib(), 1),
              "worker_peak_rss_mib": round(workers.peak_mib, 1), "worker_peak_ran": workers.peak_name,
              "driver_peak_is_per_stage": exact}
    common.progress(f"{size_key} {size}, {stage}: {wall_s:.1f} s, "
                    f"{record[f'ms_per_{unit}']:.2f} ms per {unit.replace('_', '-')}, driver "
                    f"peak {record['driver_peak_rss_mib']:.0f} MiB, largest worker "
                    f"{record['worker_peak_rss_mib']:.0f} MiB ({workers.peak_name})")
    return record


def run_stage(stage: str, cfg: config.Config, out: str, n: int, epochs: int) -> dict:
    """One stage on the discs table of `n` rows in `out`, in this (fresh) driver: the sweep (its
    chosen checkpoint lands in the sweep table, where encoding finds it), encoding, or
    classification."""
    discs_path = tables.path(out, tables.DISCS)
    trained = count_training_discs(discs_path, cfg)

    def sweep() -> None:
        run_sweep(discs_path, cfg, storage.join(out, "ray"), out, progress=lambda _: None)

    def encode() -> None:
        sweep_table = storage.read_table(tables.path(out, tables.SWEEP))
        checkpoint = sweep_table.loc[sweep_table["chosen"], "checkpoint_path"].iloc[0]
        encode_discs(discs_path, checkpoint, out, progress=lambda _: None, res=cfg.resources)

    def classify() -> None:
        discs = storage.read_table(discs_path, columns=tables.DISC_KEYS + tables.GEOMETRY
                                   + tables.BULGE + ["disc_status"])
        run_classification(discs, storage.read_table(tables.path(out, tables.LATENTS)),
                           storage.read_table(tables.path(out, tables.GRADINGS)), cfg, out)

    run, units, unit = {"sweep": (sweep, trained * epochs, "disc_epoch"),
                        "encode": (encode, n, "disc"), "classify": (classify, n, "disc")}[stage]
    return {**measured(stage, "discs", n, units, unit, run), "training_discs": trained}


def one_table(args: argparse.Namespace, per_series: list[pa.Table], gradings: pd.DataFrame,
              size: int, out: str) -> list[dict]:
    """The sweep, encoding and classification on a discs table of about `size` rows, each in a
    fresh driver process joined to this Ray: its peak memory is that stage's at that size alone,
    not what earlier stages and sizes left allocated in one long-lived process."""
    common.progress(f"writing a discs table of {size} rows (a Ray task: the driver stays clean)")
    n = ray.get(ray.remote(write_discs).remote(per_series, gradings, size, out))
    address = ray.get_runtime_context().gcs_address
    records = []
    for stage in STAGES:
        record_file = Path(out) / f"{stage}.json"
        subprocess.run([sys.executable, __file__, "--stage", stage, "--table", out,
                        "--address", address, "--preset", args.preset, "--rows", str(n),
                        "--epochs", str(args.epochs), "--json", str(record_file)], check=True)
        records.append(json.loads(record_file.read_text()))
    return records


def disc_stages(args: argparse.Namespace, cfg: config.Config, sizes: list[int], tmp: str
                ) -> list[dict]:
    per_series, gradings = ray.get(ray.remote(template).remote(cfg, storage.join(tmp,
                                                                                 "template")))
    records = []
    for size in sizes:
        out = storage.join(tmp, f"discs_{size}")
        records += one_table(args, per_series, gradings, size, out)
        shutil.rmtree(out, ignore_errors=True)
    return records


def extraction(cfg: config.Config, cohort: pd.DataFrame, checkpoint: str, out: str) -> dict:
    def extract() -> None:
        result = stream.run_extraction(cohort, cfg, checkpoint, out, progress=None)
        if result.errors:
            raise RuntimeError(result.errors[0]["reason"])

    return measured("extract", "series", len(cohort), len(cohort), "series", extract)


def series_stage(cfg: config.Config, sizes: list[int], checkpoint: str, tmp: str) -> list[dict]:
    data = storage.join(tmp, "spider")
    common.progress(f"writing a synthetic cohort of {sizes[-1]} patients")
    synthesize(data, patients=sizes[-1], seed=2, sequences=(cfg.sequence,))
    series = catalog(data, cfg.sequence).series
    for uri in [*series["image_uri"], *series["mask_uri"]]:
        storage.read_bytes(uri)  # every run then reads from the page cache
    patients = list(dict.fromkeys(series["patient_id"]))
    common.progress("cold start: one series, so every size meets Ray's workers started")
    stream.run_extraction(series.iloc[:1], cfg, checkpoint, storage.join(tmp, "cold"),
                          progress=None)
    records = []
    for size in sizes:
        out = storage.join(tmp, f"series_{size}")
        records.append(extraction(cfg, series[series["patient_id"].isin(patients[:size])],
                                  checkpoint, out))
        shutil.rmtree(out, ignore_errors=True)
    return records


def _sizes(text: str, flag: str) -> list[int]:
    sizes = sorted(int(s) for s in text.split(",") if s.strip()) if text else []
    if sizes and sizes[0] < 1:
        raise SystemExit(f"{flag} must be positive counts, got {text!r}")
    return sizes


def flatness(records: list[dict], size_key: str) -> dict:
    """Per stage: the driver's peak growth from the smallest to the largest size, and the
    time per disc (disc-epoch, series) at the largest size over the one at the second smallest
    (the smallest is dominated by fixed start-up costs)."""
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in records):
        runs = sorted((r for r in records if r["stage"] == stage), key=lambda r: r[size_key])
        if len(runs) < 2:
            continue
        base = runs[1] if len(runs) > 2 else runs[0]
        per = next(key for key in base if key.startswith("ms_per_"))
        out[stage] = {
            "driver_peak_growth": round(runs[-1]["driver_peak_rss_mib"]
                                        / runs[0]["driver_peak_rss_mib"] - 1, 3),
            f"time_{per[3:]}_ratio": round(runs[-1][per] / base[per], 3),
            "from": base[size_key], "to": runs[-1][size_key]}
    return out


def sweep_config(args: argparse.Namespace) -> config.Config:
    """The preset with a one-bottleneck sweep of --epochs epochs that never stops early."""
    return config.load(args.preset, ["sweep.bottlenecks=4", f"sweep.max_epochs={args.epochs}",
                                     "sweep.early_stop=false"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--discs", default="1000,5000,20000,50000",
                        help="discs-table sizes in rows ('' skips)")
    parser.add_argument("--series", default="64,256", help="cohort sizes in series ('' skips)")
    parser.add_argument("--epochs", type=int, default=2, help="sweep epochs per size")
    parser.add_argument("--checkpoint", help="segmenter for --series (default: the one of a "
                                             "finished `make demo`)")
    parser.add_argument("--preset", default="demo", choices=sorted(config.PRESETS))
    parser.add_argument("--json", help="result file (default: bench/results/scale.json)")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child's one stage
    parser.add_argument("--table", help=argparse.SUPPRESS)  # the child's discs-table folder
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # and its row count
    args = parser.parse_args()
    if args.stage:
        cfg = sweep_config(args)
        common.init_ray(args.address)
        Path(args.json).write_text(json.dumps(run_stage(args.stage, cfg, args.table, args.rows,
                                                        args.epochs)))
        return
    disc_sizes, series_sizes = _sizes(args.discs, "--discs"), _sizes(args.series, "--series")
    checkpoint = (args.checkpoint or common.demo_checkpoint()) if series_sizes else None
    cfg = sweep_config(args)
    common.init_ray(args.address)
    load_before = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        disc_records = disc_stages(args, cfg, disc_sizes, tmp) if disc_sizes else []
        series_records = series_stage(cfg, series_sizes, checkpoint, tmp) if series_sizes else []
    ray.shutdown()

    result = {"records": disc_records + series_records, "epochs": args.epochs,
              "flatness": {**flatness(disc_records, "discs"),
                           **flatness(series_records, "series")},
              "preset": args.preset, "checkpoint": checkpoint}
    columns = ["stage", "wall_s", "driver_rss_before_mib", "driver_peak_rss_mib",
               "worker_peak_rss_mib"]
    for records, key in ((disc_records, "discs"), (series_records, "series")):
        if records:
            print()
            print(common.table(records, [key, *columns[:2],
                                         *sorted({k for r in records for k in r
                                                  if k.startswith("ms_per_")}),
                                         *columns[2:]]))
    print(json.dumps(result["flatness"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "scale", **result}, indent=2,
                                              default=str) + "\n")
        common.progress(f"wrote {args.json}")
    else:
        common.write_result("scale", result, load_before, args)
    if any(not math.isfinite(r["wall_s"]) for r in result["records"]):
        raise SystemExit("a stage reported no time")


if __name__ == "__main__":
    main()
