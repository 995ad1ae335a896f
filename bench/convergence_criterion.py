"""The published stopping rule against ours, in one training run on the same synthetic discs.

The published code trained the autoencoder with batch 4 and stopped at the first training batch
whose IoU (train-mode output, sigmoid > 0.5, against its input) exceeded 0.995. Ours stops when
the mean IoU over ALL training discs of an epoch (eval mode) reaches 0.995. One run with our
rule records where the published rule would have stopped (epoch, wall time) and the true
whole-set mean IoU, with its 95% CI, of the model at that moment; it then trains on to the true
0.995. The difference is the real cost of the correct criterion.

A batch's IoU is the mean per-disc IoU of its discs. Measuring the whole set at the crossing
takes time the published run would not have spent; it is left out of the wall times.

The training recipe is the preset's (`--recipe config`: its loss, one-cycle schedule, batch
and eval cadence) or the one this project used before (`--recipe paper`: BCE, constant lr 2e-3,
batch 4, a whole-set pass every epoch), to measure the time to 0.995 before and after.

    python bench/convergence_criterion.py [--patients 25] [--max-epochs N] [--recipe paper]

Writes bench/results/convergence_criterion.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402, I001  (sets Ray's environment: import it before ray)

import torch  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.shape.train import Fit, TrainSpec, evaluate_ious, fit_epochs  # noqa: E402
from pipeline.shape.model import DiscAutoencoder, disc_iou, iou_summary  # noqa: E402


class PaperCriterion:
    """on_batch / on_epoch hooks for fit_epochs: the first training batch above the target, and
    the whole-set IoU of the model at that step. Wall times exclude the hooks' own work."""

    def __init__(self, model: torch.nn.Module, cubes: torch.Tensor, target: float,
                 every: int, steps_per_epoch: int):
        self.model, self.cubes, self.target, self.every = model, cubes, target, every
        self.steps_per_epoch = steps_per_epoch
        self.started = time.perf_counter()
        self.hook_s = 0.0  # seconds spent measuring, not training
        self.batches = 0  # training batches so far
        self.crossing: dict | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.hook_s

    @property
    def epoch(self) -> int:
        """The epoch the latest batch belongs to."""
        return (self.batches - 1) // self.steps_per_epoch + 1

    def on_batch(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        self.batches += 1
        if self.crossing is not None:
            return
        began = time.perf_counter()
        batch_iou = float(disc_iou(logits, x, logits=True).mean())
        if batch_iou > self.target:
            wall_s = self.elapsed()
            mean, low, high = iou_summary(evaluate_ious(self.model, self.cubes))
            self.crossing = {"epoch": self.epoch, "batch": self.batches, "wall_s": wall_s,
                             "batch_iou": batch_iou, "mean_iou": mean, "iou_ci_low": low,
                             "iou_ci_high": high}
            common.progress(f"epoch {self.epoch}: training batch IoU {batch_iou:.4f} > "
                            f"{self.target}: the published code stops here; whole-set mean IoU "
                            f"{mean:.4f} ({low:.4f}-{high:.4f})")
        self.hook_s += time.perf_counter() - began

    def on_epoch(self, fit: Fit) -> None:
        last = fit.last
        if last.epoch % self.every == 0 or fit.done:
            common.progress(f"epoch {last.epoch}: loss {last.loss:.4f}, whole-set mean IoU "
                            f"{last.mean_iou:.4f}, {self.elapsed():.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=25,
                        help="synthetic patients whose discs (six each) train the autoencoder")
    parser.add_argument("--max-epochs", type=int,
                        help="epochs, and the one-cycle schedule's length (default: the preset's)")
    parser.add_argument("--recipe", default="config", choices=["config", "paper"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--preset", default="demo", choices=sorted(config.PRESETS))
    parser.add_argument("--iou-target", type=float, help="default: the preset's (0.995)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = config.load(args.preset)
    ae = cfg.autoencoder
    if args.iou_target is not None:
        ae.iou_target = args.iou_target
    if args.recipe == "paper":
        ae.loss, ae.schedule, ae.lr, ae.batch_size, ae.eval_every = "bce", "constant", 2e-3, 4, 1
        ae.bf16, ae.adam_beta2 = False, 0.999
    args.max_epochs = args.max_epochs or ae.max_epochs
    spec = TrainSpec.from_config(cfg, ae.bottleneck, max_epochs=args.max_epochs)
    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    common.progress(f"cutting the discs of {args.patients} synthetic patients")
    cubes = torch.as_tensor(common.synthetic_disc_cubes(
        args.patients, cfg.discs.cube_size, cfg.discs.cube_spacing_mm, seed=args.seed))
    common.progress(f"training on {len(cubes)} discs ({args.recipe} recipe: {spec.loss}, "
                    f"{spec.schedule} lr {spec.lr:g}, batch {spec.batch_size}, whole-set pass "
                    f"every {spec.eval_every} epochs, bf16 {spec.bf16}), bottleneck {ae.bottleneck}, up to "
                    f"{args.max_epochs} epochs")
    torch.manual_seed(args.seed)
    model = DiscAutoencoder(cfg.discs.cube_size, ae.channels, ae.bottleneck)
    optimizer = spec.optimizer(model)
    paper = PaperCriterion(model, (cubes > 0).to(torch.uint8), ae.iou_target, every=25,
                           steps_per_epoch=math.ceil(len(cubes) / spec.batch_size))
    fit = fit_epochs(model, cubes, optimizer, batch_size=spec.batch_size,
                     max_epochs=args.max_epochs, iou_target=ae.iou_target, seed=args.seed,
                     on_epoch=paper.on_epoch, on_batch=paper.on_batch, loss=spec.loss,
                     lr_at=spec.lr_at(), eval_every=spec.eval_every, bf16=spec.bf16)
    wall_s = paper.elapsed()

    last = fit.last
    ours = {"epoch": last.epoch, "wall_s": wall_s, "mean_iou": last.mean_iou,
            "iou_ci_low": last.iou_ci_low, "iou_ci_high": last.iou_ci_high,
            "converged": fit.converged}
    rows = []
    if paper.crossing is not None:
        rows.append({"criterion": "first batch > target (published)", **paper.crossing})
    rows.append({"criterion": "whole-epoch mean >= target (ours)", **ours})
    result = {"discs": len(cubes), "batch_size": spec.batch_size, "recipe": args.recipe,
              "loss": spec.loss, "schedule": spec.schedule, "eval_every": spec.eval_every,
              "iou_target": ae.iou_target,
              "published_stop": paper.crossing, "whole_epoch_stop": ours,
              "extra_epochs": (last.epoch - paper.crossing["epoch"]
                               if paper.crossing and fit.converged else None),
              "extra_wall_s": (wall_s - paper.crossing["wall_s"]
                               if paper.crossing and fit.converged else None),
              "history": [{"epoch": s.epoch, "loss": s.loss, "mean_iou": s.mean_iou,
                           "seconds": s.seconds} for s in fit.history],
              "architecture": {"cube_size": cfg.discs.cube_size, "channels": list(ae.channels),
                               "bottleneck": ae.bottleneck, "lr": ae.lr},
              "torch_threads": args.threads, "preset": args.preset}
    print()
    print(common.table(rows, ["criterion", "epoch", "wall_s", "mean_iou", "iou_ci_low",
                              "iou_ci_high"]))
    if paper.crossing is None:
        print(f"no training batch exceeded {ae.iou_target} within {last.epoch} epochs")
    if not fit.converged:
        print(f"the whole-epoch mean IoU did not reach {ae.iou_target} within {last.epoch} "
              f"epochs (best {max(s.mean_iou for s in fit.history):.4f}): raise --max-epochs")
    elif paper.crossing is not None:
        print(f"the correct criterion costs {result['extra_epochs']} more epochs, "
              f"{result['extra_wall_s']:.0f} s more")
    common.write_result("convergence_criterion", result, load_before, args)


if __name__ == "__main__":
    main()
