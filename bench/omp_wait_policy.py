"""OpenMP's wait policy under the load a Ray job puts beside a training worker.

A Ray Train worker trains with one torch thread per CPU it holds, while Ray's own processes (Ray
Data tasks, the raylet, the driver) run on the same cores. With OpenMP's default policy idle
threads spin, and a thread that is descheduled while the others spin stalls every parallel
region; with OMP_WAIT_POLICY=PASSIVE they sleep at once, and every parallel region pays to wake
them. This times one training step of the demo's segmentation UNet (batch 2, 32x64x64) and of
its autoencoder (batch 8, 32³ cubes, bf16 autocast where native), torch threads = CPUs, under
three policies: ACTIVE (spin until there is work), PASSIVE (sleep at once), and libgomp's own
default when neither is set (spin 300,000 times, a fraction of a millisecond, then sleep), on an
idle machine and beside --busy processes that each keep a core half busy (a stand-in for Ray's
own work), each in a fresh process because OpenMP reads the variables when torch loads.

    python bench/omp_wait_policy.py [--steps 10] [--busy 1,3]

Writes bench/results/omp_wait_policy.json; the README's Performance section cites it (why Ray
workers keep OpenMP's default).
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

POLICIES = {"ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "default": {}}

STEP = """
import json, sys, time, torch
from pipeline import config
from pipeline.resources import step_autocast
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[2]))
cfg = config.demo()
if sys.argv[3] == "segmentation":
    from monai.losses import DiceCELoss
    from pipeline.segmentation.models import build_segmenter
    seg = cfg.segmentation
    model = build_segmenter(seg)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    x = torch.randn(seg.batch_size, 1, *seg.roi_size)
    y = (torch.rand(seg.batch_size, 1, *seg.roi_size) > 0.9).float()
    autocast = step_autocast("cpu", seg.bf16)()
else:
    from pipeline.shape.model import DiscAutoencoder, as_input
    from pipeline.shape.train import reconstruction_loss
    ae, size = cfg.autoencoder, cfg.discs.cube_size
    model = DiscAutoencoder(size, ae.channels, ae.bottleneck)
    x = as_input(torch.rand(ae.batch_size, size, size, size) > 0.7)
    y = x
    loss_fn = lambda logits, target: reconstruction_loss(logits.float(), target, ae.loss)
    autocast = step_autocast("cpu", ae.bf16)()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
times = []
for step in range(int(sys.argv[1]) + 2):
    started = time.perf_counter()
    optimizer.zero_grad()
    with autocast:
        out = model(x)
    loss_fn(out, y).backward()
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


def median_step_s(policy: str, steps: int, threads: int, workload: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = subprocess.run([sys.executable, "-c", STEP, str(steps), str(threads), workload],
                         env={**env, **POLICIES[policy]},
                         cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True)
    return float(json.loads(run.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--busy", default="1,3",
                        help="half-busy processes beside it, in turn (and none)")
    args = parser.parse_args(argv)
    load_before = common.load_average()
    threads = os.cpu_count() or 1
    rows = []
    levels = [0, *(int(b) for b in args.busy.split(","))]
    for busy in levels:
        stop = multiprocessing.Event()
        helpers = [multiprocessing.Process(target=_half_busy, args=(stop,), daemon=True)
                   for _ in range(busy)]
        for helper in helpers:
            helper.start()
        try:
            for workload in ("segmentation", "autoencoder"):
                for policy in POLICIES:
                    seconds = median_step_s(policy, args.steps, threads, workload)
                    rows.append({"workload": workload, "busy_processes": busy,
                                 "policy": policy, "threads": threads, "step_s": seconds})
                    common.progress(f"{workload}, {busy} busy, {policy}: {seconds:.4f} s "
                                    f"per step")
        finally:
            stop.set()
            for helper in helpers:
                helper.join()
    by = {(r["workload"], r["busy_processes"], r["policy"]): r["step_s"] for r in rows}
    ratios = {f"{policy}_over_default_{workload}_{busy}_busy":
              by[(workload, busy, policy)] / by[(workload, busy, "default")]
              for workload in ("segmentation", "autoencoder") for busy in levels
              for policy in ("ACTIVE", "PASSIVE")}
    print(common.table(rows))
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    result = {"rows": rows, **ratios}
    common.write_result("omp_wait_policy", result, load_before, args)
    return result


if __name__ == "__main__":
    main()
