"""Volumes per minute: the Ray Data extraction stream against a plain sequential loop, with the
per-stage time breakdown of both.

Both paths run the same segmenter over the same series and do the same per-series work
(pipeline.extract: read_series -> preprocess_series -> Segmenter.segment -> extract_series), so
the ratio measures only what streaming adds or costs: pipelining of reading, inference and
extraction across processes, against actor start-up, object-store transfers and the per-actor
thread count. The stream's stage times come from Ray Data's own stats (per fused stage); the
loop's from timing the same four calls.

    python bench/stream_vs_loop.py [--checkpoint RUN/checkpoint_...] [--data SPIDER_ROOT]

Without --checkpoint the segmenter of a finished `make demo` is used; without --data a
synthetic cohort of --patients patients is written to a temporary folder. Prints both rates,
their ratio and the stage table, and writes bench/results/stream_vs_loop.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402, I001  (sets Ray's environment: import it before ray)

import ray  # noqa: E402

from pipeline import config, resources  # noqa: E402
from pipeline.data import storage  # noqa: E402
from pipeline.segmentation import models as segmodels, stream  # noqa: E402
from pipeline.data.cohort import catalog  # noqa: E402
from pipeline.data.synthetic import synthesize  # noqa: E402

# The stream's operators are named after the functions they map; one stage each.
STAGES = {"read_series": "read", "preprocess_series": "preprocess", "Segmenter": "infer",
          "extract_series": "extract"}


def stage_seconds(stats) -> dict[str, float]:
    """Seconds spent in each stage, summed over series, from a Ray Data stats summary.

    Ray Data fuses adjacent maps into one operator ("Map(a)->Map(b)->MapBatches(C)"); with
    DataContext.per_stage_map_timing it times each fused stage separately, in chain order.
    """
    seconds: dict[str, float] = {}
    for operator in _operators(stats):
        names = [part.split("(", 1)[1].rstrip(")") for part in
                 operator.operator_name.split("->") if "(" in part]
        stages = [STAGES[name] for name in names if name in STAGES]
        if not stages:
            continue
        times = operator.stage_time or [operator.block_transform_time or operator.wall_time]
        if len(times) != len(stages):
            raise ValueError(f"{operator.operator_name}: {len(times)} stage timings for "
                             f"{len(stages)} stages; is per_stage_map_timing set?")
        for stage, summary_s in zip(stages, times, strict=True):
            seconds[stage] = seconds.get(stage, 0.0) + float(summary_s.sum)
    return seconds


def run_loop(series, cfg, checkpoint: str, out: str, threads: int) -> tuple[float, dict]:
    """Seconds to process every series one after another in this process (model load
    included), and the seconds spent in each stage."""
    started = time.perf_counter()
    segmenter = stream.Segmenter(checkpoint, cfg.segmentation.inference_overlap,
                                  cfg.segmentation.inference_batch_size, threads=threads)
    seg = segmodels.config_from_meta(segmenter.meta)
    seconds = dict.fromkeys(STAGES.values(), 0.0)
    for row in series.to_dict("records"):
        sample = row
        for stage, step in (("read", stream.read_series),
                            ("preprocess", lambda s: stream.preprocess_series(s, seg)),
                            ("infer", segmenter.segment),
                            ("extract", lambda s: stream.extract_series(s, cfg, out))):
            begun = time.perf_counter()
            sample = step(sample)
            seconds[stage] += time.perf_counter() - begun
        if sample["error"]:
            raise RuntimeError(sample["error"])
    return time.perf_counter() - started, seconds


def run_stream(series, cfg, checkpoint: str, out: str) -> tuple[float, dict, dict]:
    """Seconds for run_extraction over the same series (actor start-up included), the seconds
    spent in each stage, and when (seconds after the start) the Segmenter actors took their
    first series (Ray Data runs reading and preprocessing in them too: it fuses the maps) and
    the first extraction began (after its task worker started)."""
    ray.data.DataContext.get_current().per_stage_map_timing = True
    started = time.perf_counter()
    result = stream.run_extraction(series, cfg, checkpoint, out, progress=None)
    wall_s = time.perf_counter() - started
    if result.errors:
        raise RuntimeError(result.errors[0]["reason"])
    # Ray Data stamps blocks with time.perf_counter(), one monotonic clock per machine.
    began = {}
    for name, stage in (("Segmenter", "actors"), ("extract_series", "extract")):
        starts = [op.earliest_start_time for op in _operators(result.stats)
                  if name in op.operator_name and op.earliest_start_time is not None]
        began[f"{stage}_began_s"] = round(min(starts) - started, 2) if starts else float("nan")
    return wall_s, stage_seconds(result.stats), began


def _operators(stats):
    pending, found = [stats], []
    while pending:
        summary = pending.pop()
        pending.extend(summary.parents)
        found.extend(summary.operators_stats)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="segmenter checkpoint folder or URI "
                                             "(default: the one of a finished `make demo`)")
    parser.add_argument("--data", help="SPIDER-layout root (default: a fresh synthetic cohort)")
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--preset", default="demo", choices=sorted(config.PRESETS))
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--loop-threads", type=int, default=os.cpu_count(),
                        help="torch threads of the loop (default: every CPU, torch's own choice)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or common.demo_checkpoint()

    cfg = config.load(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or storage.join(tmp, "spider")
        if not args.data:
            common.progress(f"writing a synthetic cohort of {args.patients} patients")
            synthesize(data, patients=args.patients, seed=1, sequences=(cfg.sequence,))
        series = catalog(data, cfg.sequence).series
        for uri in [*series["image_uri"], *series["mask_uri"]]:
            storage.read_bytes(uri)  # both paths then find the files in the page cache
        common.init_ray(args.address)
        layout = resources.segmenter_pool(cfg.resources)
        load_before = common.load_average()  # other work on the machine skews both timings
        common.progress(f"stream: {len(series)} series, {layout.count} Segmenter actor(s)")
        stream_s, stream_stages, began = run_stream(series, cfg, checkpoint,
                                                    storage.join(tmp, "stream"))
        common.progress(f"stream done in {stream_s:.1f} s; loop with {args.loop_threads} "
                        "torch threads")
        loop_s, loop_stages = run_loop(series, cfg, checkpoint, storage.join(tmp, "loop"),
                                       args.loop_threads)
        common.progress(f"loop done in {loop_s:.1f} s")
        cluster = ray.cluster_resources()
        ray.shutdown()

    n = len(series)
    stages = [{"stage": stage, "stream_s_per_series": stream_stages.get(stage, float("nan")) / n,
               "loop_s_per_series": loop_stages[stage] / n}
              for stage in STAGES.values()]
    startup_s = began["actors_began_s"]
    steady_s = stream_s - startup_s
    result = {
        "series": n,
        "stream_s": round(stream_s, 2),
        "loop_s": round(loop_s, 2),
        "stream_volumes_per_min": round(60 * n / stream_s, 2),
        "loop_volumes_per_min": round(60 * n / loop_s, 2),
        "stream_over_loop": round(loop_s / stream_s, 3),
        # actors: actor start and model load before the first series; extract: also the
        # first extraction task's worker start
        **{f"stream_{key}": value for key, value in began.items()},
        "stream_volumes_per_min_after_startup": round(60 * n / steady_s, 2),
        "stages": stages,
        "cpus": cluster.get("CPU", 0),
        "gpus": cluster.get("GPU", 0),
        "segmenter_actors": dataclasses.asdict(layout),
        "loop_torch_threads": args.loop_threads,
        "preset": args.preset,
        "checkpoint": checkpoint,
    }
    print(f"\nstream: {result['stream_volumes_per_min']:.1f} volumes/min ({stream_s:.1f} s, of "
          f"which {startup_s:.1f} s before the Segmenter actors took the first series; "
          f"{result['stream_volumes_per_min_after_startup']:.1f} volumes/min after it)")
    print(f"loop:   {result['loop_volumes_per_min']:.1f} volumes/min ({loop_s:.1f} s)")
    print(f"stream / loop throughput: {result['stream_over_loop']:.2f}x over {n} series")
    print("\nseconds per series in each stage (stream: Ray Data stats, summed over actors and "
          "tasks that run in parallel)")
    print(common.table(stages))
    common.write_result("stream_vs_loop", result, load_before, args)


if __name__ == "__main__":
    main()
