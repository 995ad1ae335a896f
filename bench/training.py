"""Training efficiency: autoencoder throughput on 1 and 2 Ray Train workers, segmentation training
throughput, the fixed cost of a TorchTrainer.fit(), and Ray Train's overhead over a plain loop.

The overhead comparison trains the same autoencoder (same discs, seed, epochs and torch threads)
through the same code (pipeline.shape.train.train_cubes -> fit_epochs): in this process, and in one
Ray Train worker, alternating --rounds times (this machine's speed drifts by +-20% over minutes;
alternating keeps a slow spell from landing on one side only). The raw wall-time ratio includes
Ray Train's start-up, which a real run pays once; the per-epoch ratio (median epoch over all
rounds) and the ratio projected over --real-run-epochs epochs show what is left once it is
amortised (target: <= 1.2x).

An epoch is the training steps plus its share of the whole-training-set IoU pass that decides
convergence (run every `eval_every` epochs); discs/s counts the discs trained per epoch over its
seconds. The convergence target is set out of reach so every run trains exactly --epochs epochs.

    python bench/training.py [--patients 25] [--epochs 30] [--rounds 3] [--seg-patients 8]
                             [--seg-epochs 3]

Writes bench/results/training.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402, I001  (sets Ray's environment: import it before ray)

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.data import storage, tables  # noqa: E402
from pipeline.shape.train import TrainSpec, train_autoencoder, train_cubes  # noqa: E402
from pipeline import resources  # noqa: E402
from pipeline.config import ResourcesConfig  # noqa: E402
from pipeline.data.cohort import catalog  # noqa: E402
from pipeline.segmentation.train import train_segmenter  # noqa: E402
from pipeline.data.synthetic import synthesize  # noqa: E402

UNREACHABLE_IOU = 2.0  # no epoch converges: every run trains exactly the epochs asked for


def write_discs(cubes, folder: str) -> str:
    """A discs.parquet folder holding the cubes as reference-mask discs of training patients,
    the rows train_autoencoder selects."""
    n = len(cubes)
    frame = pd.DataFrame({"patient_id": [str(i // 6) for i in range(n)],
                          "series_id": [f"{i // 6}_t1" for i in range(n)],
                          "ivd_label": [201 + i % 6 for i in range(n)], "level": "",
                          "mask_source": "reference", "split": "train", "cube_fits": True})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    path = storage.join(folder, "discs.parquet")
    storage.write_table(table.append_column(tables.CUBE, tables.cube_array(cubes)),
                        storage.join(path, "synthetic.parquet"))
    return path


def _noop_loop(config: dict) -> None:
    """A worker loop that does nothing: what is left of fit() is Ray Train's own cost."""


def fit_overhead_s(workers: int, storage_path: str) -> float:
    """Wall seconds of TorchTrainer.fit() with an empty loop on `workers` workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = resources.training(ResourcesConfig(), workers).cpus
    trainer = TorchTrainer(
        _noop_loop, scaling_config=ScalingConfig(num_workers=workers,
                                                 resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"noop-{uuid.uuid4().hex[:8]}", storage_path=storage_path))
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def epoch_row(label: str, history: list[dict], wall_s: float, workers: int, threads: int
              ) -> dict:
    """Throughput of one autoencoder run from its history: one entry per whole-set IoU pass,
    every `eval_every` epochs, so each entry's seconds are spread over the epochs it covers."""
    ends = [h["epoch"] for h in history]
    spans = [end - start for start, end in zip([0, *ends], ends, strict=False)]
    seconds = [h["seconds"] / span for h, span in zip(history, spans, strict=True)]
    steady = statistics.median(seconds)
    n_discs = history[-1]["n_discs"]
    return {"run": label, "workers": workers, "threads_per_worker": threads,
            "epoch_s": seconds,
            "epochs": ends[-1], "discs": n_discs, "wall_s": wall_s,
            "epoch_s_median": steady,
            "outside_epochs_s": wall_s - sum(h["seconds"] for h in history),
            "discs_per_s": n_discs / steady,
            "discs_per_s_end_to_end": n_discs * ends[-1] / wall_s}


def plain_run(cubes, cfg, bottleneck: int, epochs: int, threads: int, label: str) -> dict:
    """The autoencoder trained in this process, through the loop Ray Train workers run."""
    torch.set_num_threads(threads)
    spec = TrainSpec.from_config(cfg, bottleneck, max_epochs=epochs)
    started = time.perf_counter()
    fit = train_cubes(cubes, spec, report=lambda metrics, folder: None)
    wall_s = time.perf_counter() - started
    return epoch_row(label, [dataclasses.asdict(s) for s in fit.history], wall_s, 1, threads)


def ray_run(discs_path: str, cfg, bottleneck: int, epochs: int, workers: int,
            storage_path: str, label: str) -> dict:
    cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder,
                                                                   num_workers=workers))
    result = train_autoencoder(discs_path, cfg, bottleneck, storage_path,
                               name=f"ae-{workers}w-{uuid.uuid4().hex[:8]}",
                               progress=common.progress, max_epochs=epochs)
    return epoch_row(label, result.history, result.wall_s, workers, result.threads_per_worker)


def segmentation_run(patients: int, epochs: int, cfg, storage_path: str, tmp: str) -> dict:
    """Segmentation training throughput: random crops per second over whole epochs (each epoch
    ends with sliding-window validation on the validation volumes, included)."""
    data = storage.join(tmp, "seg_spider")
    synthesize(data, patients=patients, seed=3, sequences=(cfg.sequence,))
    series = catalog(data, cfg.sequence).series
    seg = dataclasses.replace(cfg.segmentation, epochs=epochs, patience=epochs + 1)
    cfg = dataclasses.replace(cfg, segmentation=seg)
    started = time.perf_counter()
    result = train_segmenter(series, cfg, storage_path, f"seg-{uuid.uuid4().hex[:8]}",
                             progress=common.progress)
    wall_s = time.perf_counter() - started
    n_train = int((series["split"] == "train").sum())
    steady = statistics.median(h["seconds"] for h in result.history)
    crops = n_train * seg.crops_per_volume
    return {"model": seg.model, "train_volumes": n_train,
            "val_volumes": int((series["split"] == "val").sum()), "epochs": result.epochs_run,
            "crops_per_epoch": crops, "crop_shape": list(seg.roi_size),
            "batch_size": seg.batch_size, "epoch_s_median": steady,
            "crops_per_s": crops / steady, "train_volumes_per_s": n_train / steady,
            "wall_s": wall_s, "outside_epochs_s": wall_s - sum(h["seconds"]
                                                                for h in result.history)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=25, help="synthetic patients whose "
                        "discs (six each) the autoencoder trains on")
    parser.add_argument("--epochs", type=int, default=30, help="autoencoder epochs per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain / Ray Train "
                        "(1 worker) pairs behind the overhead ratio")
    parser.add_argument("--seg-patients", type=int, default=8)
    parser.add_argument("--seg-epochs", type=int, default=3)
    parser.add_argument("--real-run-epochs", type=int, default=300,
                        help="epochs of a real run, to amortise start-up over")
    parser.add_argument("--preset", default="demo", choices=sorted(config.PRESETS))
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    args = parser.parse_args()

    cfg = config.load(args.preset)
    cfg.autoencoder.iou_target = UNREACHABLE_IOU
    bottleneck = cfg.autoencoder.bottleneck
    with tempfile.TemporaryDirectory() as tmp:
        common.progress(f"cutting the discs of {args.patients} synthetic patients")
        cubes = common.synthetic_disc_cubes(args.patients, cfg.discs.cube_size,
                                            cfg.discs.cube_spacing_mm)
        discs_path = write_discs(cubes, tmp)
        common.init_ray(args.address)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        storage_path = storage.join(tmp, "ray_train")
        load_before = common.load_average()

        overhead = {}
        for workers in (1, 2):
            common.progress(f"TorchTrainer.fit() with an empty loop, {workers} worker(s)")
            overhead[workers] = fit_overhead_s(workers, storage_path)
            common.progress(f"  {overhead[workers]:.1f} s")
        plain, ray1 = [], []
        for r in range(1, args.rounds + 1):
            common.progress(f"round {r}/{args.rounds}: autoencoder, plain loop, {len(cubes)} "
                            f"discs x {args.epochs} epochs")
            plain.append(plain_run(cubes, cfg, bottleneck, args.epochs, threads=cpus,
                                   label=f"plain loop, round {r}"))
            common.progress(f"  {plain[-1]['wall_s']:.1f} s")
            common.progress(f"round {r}/{args.rounds}: autoencoder, Ray Train with 1 worker")
            ray1.append(ray_run(discs_path, cfg, bottleneck, args.epochs, 1, storage_path,
                                label=f"Ray Train, 1 worker, round {r}"))
        common.progress("autoencoder, Ray Train with 2 workers")
        runs = plain + ray1 + [ray_run(discs_path, cfg, bottleneck, args.epochs, 2,
                                       storage_path, label="Ray Train, 2 workers")]
        common.progress(f"segmentation training: {args.seg_patients} patients, "
                        f"{args.seg_epochs} epochs")
        segmentation = segmentation_run(args.seg_patients, args.seg_epochs, cfg, storage_path,
                                        tmp)
        ray.shutdown()

    real = args.real_run_epochs

    def pooled(side: list[dict]) -> dict:
        """One side's median epoch over all rounds, mean wall and mean time outside epochs."""
        return {"epoch_s": statistics.median(s for run in side for s in run["epoch_s"]),
                "wall_s": statistics.mean(run["wall_s"] for run in side),
                "outside_epochs_s": statistics.mean(run["outside_epochs_s"] for run in side)}

    p, r = pooled(plain), pooled(ray1)
    epoch_ratio = r["epoch_s"] / p["epoch_s"]

    def projected(side: dict) -> float:
        return side["outside_epochs_s"] + real * side["epoch_s"]

    overhead_result = {
        "rounds": args.rounds,
        "plain_epoch_s_median": p["epoch_s"], "ray_epoch_s_median": r["epoch_s"],
        "raw_wall_ratio": r["wall_s"] / p["wall_s"],
        "per_epoch_ratio": epoch_ratio,
        "per_epoch_ratio_by_round": [b["epoch_s_median"] / a["epoch_s_median"]
                                     for a, b in zip(plain, ray1, strict=True)],
        "real_run_epochs": real,
        "projected_real_run_ratio": projected(r) / projected(p),
        "target": 1.2,
        "ray_outside_epochs_s": r["outside_epochs_s"],
    }
    result = {"autoencoder": runs, "fit_overhead_s": {f"{w}_workers": s for w, s in
                                                      overhead.items()},
              "ray_train_overhead": overhead_result, "segmentation": segmentation,
              "architecture": {"cube_size": cfg.discs.cube_size,
                               "channels": list(cfg.autoencoder.channels),
                               "bottleneck": bottleneck, "batch_size": cfg.autoencoder.batch_size},
              "preset": args.preset}
    print("\nautoencoder training (epoch = training steps + its share of the whole-set IoU pass)")
    print(common.table(runs, [c for c in runs[0] if c != "epoch_s"]))
    print("\nTorchTrainer.fit() of an empty loop: "
          + ", ".join(f"{s:.1f} s with {w} worker(s)" for w, s in overhead.items()))
    by_round = ", ".join(f"{x:.2f}x" for x in overhead_result["per_epoch_ratio_by_round"])
    print(f"Ray Train / plain loop, same discs and {args.epochs} epochs, {args.rounds} rounds: "
          f"{overhead_result['raw_wall_ratio']:.2f}x wall, {epoch_ratio:.2f}x per epoch "
          f"(by round: {by_round}); "
          f"over a {real}-epoch run: {overhead_result['projected_real_run_ratio']:.2f}x "
          f"(target <= 1.2x)")
    print(f"\nsegmentation training ({segmentation['model']}, {segmentation['train_volumes']} "
          f"training volumes, crops {segmentation['crop_shape']}, batch "
          f"{segmentation['batch_size']}): {segmentation['crops_per_s']:.2f} crops/s, "
          f"{segmentation['epoch_s_median']:.1f} s per epoch incl. validation of "
          f"{segmentation['val_volumes']} volumes")
    common.write_result("training", result, load_before, args)


if __name__ == "__main__":
    main()
