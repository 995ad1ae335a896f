"""OpenMP's wait policy under the load a Ray job puts beside a training worker.

A Ray Train worker trains with one torch thread per CPU it holds, while Ray's own processes (Ray
Data tasks, the raylet, the driver) run on the same cores. With OpenMP's default policy idle
threads spin, and a thread that is descheduled while the others spin stalls every parallel
region. This times one training step of the demo's segmentation UNet (batch 2, 32x64x64, torch
threads = CPUs) with OMP_WAIT_POLICY=ACTIVE and =PASSIVE, on an idle machine and beside
--busy processes that each keep a core half busy (a stand-in for Ray's own work), each in a fresh
process because OpenMP reads the variable when torch loads.

    python bench/omp_wait_policy.py [--steps 10] [--busy 1]

Writes bench/results/omp_wait_policy.json; pipeline/resources.py's WORKER_ENV cites it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

STEP = """
import json, sys, time, torch
from monai.losses import DiceCELoss
from pipeline import config
from pipeline.segmentation.models import build_segmenter
seg = config.demo().segmentation
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[2]))
model = build_segmenter(seg)
optimizer = torch.optim.Adam(model.parameters(), lr=seg.lr)
loss_fn = DiceCELoss(sigmoid=True, batch=True)
x = torch.randn(seg.batch_size, 1, *seg.roi_size)
y = (torch.rand(seg.batch_size, 1, *seg.roi_size) > 0.9).float()
times = []
for step in range(int(sys.argv[1]) + 2):
    started = time.perf_counter()
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()
    times.append(time.perf_counter() - started)
print(json.dumps(sorted(times[2:])[len(times[2:]) // 2]))
"""


def _half_busy(stop) -> None:
    """Busy for 5 ms, asleep for 5 ms: a core's worth of intermittent work, as Ray's is."""
    while not stop.is_set():
        until = time.perf_counter() + 0.005
        while time.perf_counter() < until:
            pass
        time.sleep(0.005)


def median_step_s(policy: str, steps: int, threads: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    run = subprocess.run([sys.executable, "-c", STEP, str(steps), str(threads)], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True)
    return float(json.loads(run.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--busy", type=int, default=1, help="half-busy processes beside it")
    args = parser.parse_args(argv)
    load_before = common.load_average()
    threads = os.cpu_count() or 1
    rows = []
    for busy in (0, args.busy):
        stop = multiprocessing.Event()
        helpers = [multiprocessing.Process(target=_half_busy, args=(stop,), daemon=True)
                   for _ in range(busy)]
        for helper in helpers:
            helper.start()
        try:
            for policy in ("ACTIVE", "PASSIVE"):
                seconds = median_step_s(policy, args.steps, threads)
                rows.append({"busy_processes": busy, "policy": policy, "threads": threads,
                             "step_s": seconds})
                common.progress(f"{busy} busy, {policy}: {seconds:.3f} s per step")
        finally:
            stop.set()
            for helper in helpers:
                helper.join()
    by = {(r["busy_processes"], r["policy"]): r["step_s"] for r in rows}
    ratios = {f"active_over_passive_{busy}_busy": by[(busy, "ACTIVE")] / by[(busy, "PASSIVE")]
              for busy in (0, args.busy)}
    print(common.table(rows))
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    result = {"rows": rows, **ratios}
    common.write_result("omp_wait_policy", result, load_before, args)
    return result


if __name__ == "__main__":
    main()
