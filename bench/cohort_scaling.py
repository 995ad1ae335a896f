"""Cost against cohort size: the extraction stream over synthetic cohorts of growing size.

Seconds per series should stay flat, or fall as the fixed costs (actor start-up, model load, Ray
Data start) spread over more series; a straight-line fit of wall time on series count separates
the fixed cost from the marginal cost of one more series. The driver's peak memory must stay flat
whatever the size: volumes flow between Ray workers and never gather on the driver.

    python bench/cohort_scaling.py [--checkpoint RUN/checkpoint_...] [--sizes 8,16,32,64]

Without --checkpoint the segmenter of a finished `make demo` is used. One synthetic cohort of the
largest size is written once; each run takes its first N patients. A one-series run first
starts Ray's worker processes (reported as the cold start), so every size meets the same warm
Ray, as the stages of one job do. Writes bench/results/cohort_scaling.json.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402, I001  (sets Ray's environment: import it before ray)

import numpy as np  # noqa: E402
import ray  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.data import storage  # noqa: E402
from pipeline.segmentation import stream  # noqa: E402
from pipeline.data.cohort import catalog  # noqa: E402
from pipeline.data.synthetic import synthesize  # noqa: E402


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS counter (VmHWM), so the next peak belongs to the next
    run alone. False where the kernel does not allow it: the peak is then since start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        return _status_mib("VmHWM")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="segmenter checkpoint folder or URI "
                                             "(default: the one of a finished `make demo`)")
    parser.add_argument("--sizes", default="8,16,32,64", help="cohort sizes in patients")
    parser.add_argument("--preset", default="demo", choices=sorted(config.PRESETS))
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or common.demo_checkpoint()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--sizes must be positive patient counts, got {args.sizes!r}")

    cfg = config.load(args.preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = storage.join(tmp, "spider")
        common.progress(f"writing a synthetic cohort of {sizes[-1]} patients")
        synthesize(data, patients=sizes[-1], seed=2, sequences=(cfg.sequence,))
        series = catalog(data, cfg.sequence).series
        for uri in [*series["image_uri"], *series["mask_uri"]]:
            storage.read_bytes(uri)  # every run then reads from the page cache
        patients = list(dict.fromkeys(series["patient_id"]))
        common.init_ray(args.address)
        load_before = common.load_average()
        common.progress("cold start: one series on a fresh Ray")
        started = time.perf_counter()
        stream.run_extraction(series.iloc[:1], cfg, checkpoint, storage.join(tmp, "cold"),
                               progress=None)
        cold_start_s = time.perf_counter() - started
        for size in sizes:
            cohort = series[series["patient_id"].isin(patients[:size])]
            out = storage.join(tmp, f"out_{size}")
            rss_before = _status_mib("VmRSS")
            exact = reset_peak_rss()
            common.progress(f"{size} patients ({len(cohort)} series)")
            started = time.perf_counter()
            result = stream.run_extraction(cohort, cfg, checkpoint, out, progress=None)
            wall_s = time.perf_counter() - started
            if result.errors:
                raise RuntimeError(result.errors[0]["reason"])
            rows.append({"patients": size, "series": len(cohort), "wall_s": wall_s,
                         "s_per_series": wall_s / len(cohort),
                         "driver_rss_before_mib": rss_before,
                         "driver_peak_rss_mib": peak_rss_mib(),
                         "peak_is_per_run": exact, "discs": result.n_discs})
            common.progress(f"{size} patients: {wall_s:.1f} s, {wall_s / len(cohort):.2f} s per "
                            f"series, driver peak {rows[-1]['driver_peak_rss_mib']:.0f} MiB")
            shutil.rmtree(out, ignore_errors=True)
        ray.shutdown()

    counts = np.array([r["series"] for r in rows], dtype=float)
    walls = np.array([r["wall_s"] for r in rows])
    fit = {}
    if len(rows) >= 2:
        marginal, fixed = np.polyfit(counts, walls, 1)
        fit = {"fixed_s": round(float(fixed), 2), "marginal_s_per_series": round(float(marginal), 3)}
    peaks = [r["driver_peak_rss_mib"] for r in rows]
    result = {"runs": rows, "fit_wall_s_on_series": fit,
              "cold_start_one_series_s": round(cold_start_s, 2),
              "driver_peak_rss_spread_mib": round(max(peaks) - min(peaks), 1),
              "preset": args.preset, "checkpoint": checkpoint}
    print()
    print(common.table(rows, ["patients", "series", "wall_s", "s_per_series",
                              "driver_rss_before_mib", "driver_peak_rss_mib"]))
    if fit:
        print(f"wall ≈ {fit['fixed_s']:.1f} s fixed + {fit['marginal_s_per_series']:.2f} s per "
              "series (least squares over the sizes)")
    print(f"cold start (one series on a fresh Ray): {cold_start_s:.1f} s")
    print(f"driver peak memory spread across sizes: {result['driver_peak_rss_spread_mib']:.0f} "
          "MiB")
    common.write_result("cohort_scaling", result, load_before, args)


if __name__ == "__main__":
    main()
