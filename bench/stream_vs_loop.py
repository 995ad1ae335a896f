"""Volumes per minute: the Ray Data extraction stream against a plain sequential loop.

Both paths run the same trained segmenter over the same series and do the same per-series work
(pipeline.extract.load_series -> Segmenter.segment -> extract_series; the loop calls them through
extract.process_series), so the ratio measures only what streaming adds or costs: pipelining of
reading, inference and extraction across processes, against actor start-up, object-store
transfers and the per-actor thread count.

    python bench/stream_vs_loop.py --checkpoint RUN/checkpoint_... [--data SPIDER_ROOT]

Without --data a synthetic cohort of --patients patients is written to a temporary folder.
Prints both rates and their ratio and writes bench/results/stream_vs_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from pipeline import config, extract, storage  # noqa: E402
from pipeline.cohort import catalog  # noqa: E402
from pipeline.synthetic import synthesize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stream_vs_loop.json"


def run_loop(series, cfg, checkpoint: str, out: str, threads: int) -> float:
    """Seconds to process every series one after another in this process."""
    started = time.perf_counter()
    segmenter = extract.Segmenter(checkpoint, cfg.segmentation.inference_overlap,
                                  cfg.segmentation.inference_batch_size, threads=threads)
    for row in series.to_dict("records"):
        record = extract.process_series(row, segmenter, cfg, out)
        if record["error"]:
            raise RuntimeError(record["error"])
    return time.perf_counter() - started


def run_stream(series, cfg, checkpoint: str, out: str) -> float:
    """Seconds for run_extraction over the same series, actor start-up included."""
    started = time.perf_counter()
    result = extract.run_extraction(series, cfg, checkpoint, out, progress=None)
    if result.errors:
        raise RuntimeError(result.errors[0]["reason"])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="segmenter checkpoint folder or URI")
    parser.add_argument("--data", help="SPIDER-layout root (default: a fresh synthetic cohort)")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--preset", default="demo", choices=sorted(config.PRESETS))
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--loop-threads", type=int, default=os.cpu_count(),
                        help="torch threads of the loop (default: every CPU, torch's own choice)")
    args = parser.parse_args()

    cfg = config.load(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or storage.join(tmp, "spider")
        if not args.data:
            synthesize(data, patients=args.patients, seed=1, sequences=(cfg.sequence,))
        series = catalog(data, cfg.sequence).series
        for uri in [*series["image_uri"], *series["mask_uri"]]:
            storage.read_bytes(uri)  # both paths then find the files in the page cache
        ray.init(address=args.address, log_to_driver=False, include_dashboard=False,
                 configure_logging=False)
        layout = extract.actor_layout()
        load_before = os.getloadavg()[0]  # other work on the machine skews both timings
        stream_s = run_stream(series, cfg, args.checkpoint, storage.join(tmp, "stream"))
        loop_s = run_loop(series, cfg, args.checkpoint, storage.join(tmp, "loop"),
                          args.loop_threads)
        resources = ray.cluster_resources()
        ray.shutdown()

    n = len(series)
    result = {
        "series": n,
        "stream_s": round(stream_s, 2),
        "loop_s": round(loop_s, 2),
        "stream_volumes_per_min": round(60 * n / stream_s, 2),
        "loop_volumes_per_min": round(60 * n / loop_s, 2),
        "stream_over_loop": round(loop_s / stream_s, 3),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
        "segmenter_actors": layout,
        "loop_torch_threads": args.loop_threads,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "machine": platform.processor() or platform.machine(),
        "preset": args.preset,
        "checkpoint": args.checkpoint,
    }
    print(f"stream: {result['stream_volumes_per_min']:.1f} volumes/min ({stream_s:.1f} s)")
    print(f"loop:   {result['loop_volumes_per_min']:.1f} volumes/min ({loop_s:.1f} s)")
    print(f"stream / loop throughput: {result['stream_over_loop']:.2f}x over {n} series")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
