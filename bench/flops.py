"""Against the limit: floating-point work of one autoencoder training step and of one
segmentation inference per volume, against this machine's measured matmul and conv FLOP/s.

FLOPs are counted by torch.utils.flop_counter (multiply-adds of matmuls and convolutions count
2; elementwise work such as BatchNorm, ReLU and Adam counts 0, so it shows up as time that buys
no counted FLOPs). The ceilings are a large float32 matmul and a wide 3D convolution timed in the
same run, at each thread count. Achieved FLOP/s over the ceiling says how much of the machine a
workload uses; the diagnostics say where the rest goes:
- autoencoder: forward / backward / optimizer time, each layer's forward FLOP/s, a larger batch
  (per-step overheads amortised), 1 thread against all;
- segmentation inference: the network alone on the sliding-window batches against the whole
  sliding-window call (padding, Gaussian blending, Python), sliding-window batch 1 against 4.

Weights do not change the work, so the segmenter is built from the preset, untrained.

    python bench/flops.py [--threads 1,2] [--volumes 2]

Writes bench/results/flops.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402, I001  (sets Ray's environment: import it before ray)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.data import set_track_meta  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.data import checkpoints  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.segmentation import models as segmodels, stream  # noqa: E402
from pipeline.shape.model import DiscAutoencoder, as_input  # noqa: E402
from pipeline.resources import native_bf16, step_autocast  # noqa: E402
from pipeline.shape.train import TrainSpec, reconstruction_loss  # noqa: E402
from pipeline.data.cohort import catalog  # noqa: E402
from pipeline.data.synthetic import synthesize  # noqa: E402

GIGA = 1e9


def flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def seconds_per_call(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of one call (after warm-up calls that pay one-off allocations)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ceilings(matmul_size: int, conv_size: int, repeats: int) -> dict:
    """Achieved FLOP/s of a square float32 matmul and of a wide 64->64 channel 3x3x3 conv, and
    of that conv in bf16 autocast where the CPU computes bf16 natively (a bf16 step's own
    ceiling; the float32 conv stays the yardstick every fraction is taken against)."""
    a, b = torch.randn(matmul_size, matmul_size), torch.randn(matmul_size, matmul_size)
    conv = nn.Conv3d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, conv_size, conv_size, conv_size)
    with torch.inference_mode():
        matmul_s = seconds_per_call(lambda: a @ b, repeats)
        conv_s = seconds_per_call(lambda: conv(x), repeats)
        conv_flops = flops_of(lambda: conv(x))
        with step_autocast("cpu", bf16=True)():
            bf16_s = seconds_per_call(lambda: conv(x), repeats)
    return {"matmul_gflops": 2 * matmul_size**3 / matmul_s / GIGA,
            "conv3d_gflops": conv_flops / conv_s / GIGA,
            "conv3d_bf16_gflops": conv_flops / bf16_s / GIGA if native_bf16("cpu") else None}


class AutoencoderStep:
    """One training step of the preset's autoencoder (its loss on logits, Adam, bf16 autocast
    where the config asks and the CPU has it), as fit_epochs runs it, on a batch of synthetic
    disc cubes."""

    def __init__(self, cfg: config.Config, cubes: np.ndarray, batch: int, bf16: bool):
        torch.manual_seed(0)
        self.model = DiscAutoencoder(cfg.discs.cube_size, cfg.autoencoder.channels,
                                     cfg.autoencoder.bottleneck)
        self.optimizer = TrainSpec.from_config(cfg, cfg.autoencoder.bottleneck).optimizer(
            self.model)
        self.loss = cfg.autoencoder.loss
        self.autocast = step_autocast("cpu", bf16)
        self.x = as_input(cubes[np.arange(batch) % len(cubes)])

    def counted_flops(self) -> dict:
        """FLOPs of the forward pass and of the whole step as the paper's layers compute them:
        counted on a meta-device copy, where UpConv3d runs as nn's transposed
        convolution (on CPU it does 2.4x that layer's multiply-adds, in a third of the time;
        counting those would flatter the FLOP rate)."""
        model, x = copy.deepcopy(self.model).to("meta"), self.x.to("meta")

        def forward() -> torch.Tensor:
            return reconstruction_loss(model(x), x, self.loss)

        return {"forward": flops_of(forward), "step": flops_of(lambda: forward().backward())}

    def forward(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.model(self.x).float()
        return reconstruction_loss(logits, self.x, self.loss)

    def __call__(self) -> None:
        self.forward().backward()
        self.optimizer.step()

    def phases(self, repeats: int) -> dict:
        """Median seconds and counted FLOPs of forward, backward and optimizer step."""
        counted = self.counted_flops()
        flops = {"forward": counted["forward"], "backward": counted["step"] - counted["forward"],
                 "optimizer": 0}  # Adam is elementwise: nothing the counter counts
        self()
        seconds = {phase: [] for phase in flops}
        for _ in range(repeats):
            marks = [time.perf_counter()]
            loss = self.forward()
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            self.optimizer.step()
            marks.append(time.perf_counter())
            for phase, begun, ended in zip(seconds, marks[:-1], marks[1:], strict=True):
                seconds[phase].append(ended - begun)
        return {phase: {"s": statistics.median(times), "gflop": flops[phase] / GIGA,
                        "gflops": flops[phase] / statistics.median(times) / GIGA}
                for phase, times in seconds.items()}

    def layers(self, repeats: int) -> list[dict]:
        """Forward FLOP/s of every convolution and linear layer on its real input shape."""
        inputs = {}

        def keep_input(name: str):
            def hook(module, args, output) -> None:  # None: the output stays as it is
                inputs[name] = args[0].detach()
            return hook

        hooks = [module.register_forward_hook(keep_input(name))
                 for name, module in self.model.named_modules()
                 if isinstance(module, nn.Conv3d | nn.ConvTranspose3d | nn.Linear)]
        with torch.inference_mode():
            self.model(self.x)
        for hook in hooks:
            hook.remove()
        modules = dict(self.model.named_modules())
        rows = []
        with torch.inference_mode():
            for name, x in inputs.items():
                module = modules[name]
                meta = copy.deepcopy(module).to("meta")  # the paper's layer's work, as above
                flops = flops_of(lambda m=meta, x=x: m(x.to("meta")))
                seconds = seconds_per_call(lambda m=module, x=x: m(x), repeats)
                rows.append({"layer": f"{name} {type(module).__name__}",
                             "input": "x".join(str(s) for s in x.shape[1:]),
                             "ms": 1e3 * seconds, "gflop": flops / GIGA,
                             "gflops": flops / seconds / GIGA})
        total = sum(r["ms"] for r in rows)
        for row in rows:
            row["share_of_layer_time"] = row["ms"] / total
        return rows


def segmentation_volumes(cfg: config.Config, patients: int, tmp: str) -> list[np.ndarray]:
    """Preprocessed synthetic volumes on the preset's model grid, as the Segmenter gets them."""
    data = os.path.join(tmp, "spider")
    synthesize(data, patients=patients, seed=4, sequences=(cfg.sequence,))
    rows = catalog(data, cfg.sequence).series.to_dict("records")
    return [np.asarray(stream.load_series(row, cfg.segmentation)["image"]) for row in rows]


def segmenter(cfg: config.Config, tmp: str, sw_batch_size: int, threads: int
              ) -> stream.Segmenter:
    folder = os.path.join(tmp, "segmenter")
    if not os.path.exists(folder):
        os.makedirs(folder)
        torch.manual_seed(0)
        model = segmodels.build_segmenter(cfg.segmentation)
        checkpoints.write(folder, model.eval(),
                                   {"segmentation": dataclasses.asdict(cfg.segmentation)})
    return stream.Segmenter(folder, cfg.segmentation.inference_overlap, sw_batch_size,
                             threads=threads)


def inference_row(cfg, volumes, tmp: str, threads: int, repeats: int, sw_batch: int) -> dict:
    """Per-volume inference FLOPs and time, and how much of the time the network itself takes
    (its windows run alone, batched as sliding_window_inference batches them)."""
    model = segmenter(cfg, tmp, sw_batch, threads)
    flops = np.mean([flops_of(lambda v=v: model.probability(v)) for v in volumes])
    seconds = np.mean([seconds_per_call(lambda v=v: model.probability(v), repeats, warmup=1)
                       for v in volumes])
    window = torch.randn(sw_batch, 1, *cfg.segmentation.roi_size)
    with torch.inference_mode():
        window_flops = flops_of(lambda: model.model(window))
        window_s = seconds_per_call(lambda: model.model(window), repeats)
    network_s = flops / window_flops * window_s
    return {"threads": threads, "sw_batch_size": sw_batch,
            "gflop_per_volume": flops / GIGA, "s_per_volume": seconds,
            "gflops": flops / seconds / GIGA, "network_gflops": window_flops / window_s / GIGA,
            "network_share_of_time": network_s / seconds}


def paper_work(batch: int) -> dict:
    """The paper preset's work, counted (not timed: no GPU here): one autoencoder training step
    (64³ cubes, 32->512 channels; on the meta device, no arithmetic done) and one SwinUNETR
    forward pass over a 96³ sliding window (real tensors: MONAI's SwinUNETR reads a value)."""
    cfg = config.paper()
    ae = cfg.autoencoder
    with torch.device("meta"):
        model = DiscAutoencoder(cfg.discs.cube_size, ae.channels, ae.bottleneck)
        x = torch.rand(batch, 1, *(cfg.discs.cube_size,) * 3)
    step = flops_of(lambda: reconstruction_loss(model(x), x, ae.loss).backward())
    torch.manual_seed(0)
    segmenter = segmodels.build_segmenter(cfg.segmentation).eval()
    window = torch.randn(1, 1, *cfg.segmentation.roi_size)
    with torch.inference_mode():
        window_flops = flops_of(lambda: segmenter(window))
    return {"autoencoder_gflop_per_disc_step": step / batch / GIGA,
            "autoencoder_batch": batch, "cube_size": cfg.discs.cube_size,
            "channels": list(ae.channels), "segmenter": cfg.segmentation.model,
            "segmenter_gflop_per_window": window_flops / GIGA,
            "roi_size": list(cfg.segmentation.roi_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}",
                        help="torch thread counts to measure (comma-separated)")
    parser.add_argument("--patients", type=int, default=4,
                        help="synthetic patients whose discs feed the autoencoder step")
    parser.add_argument("--volumes", type=int, default=2, help="synthetic volumes to segment")
    parser.add_argument("--large-batch", type=int, default=32,
                        help="autoencoder batch that shows per-step overheads amortised")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--conv-size", type=int, default=32, help="conv ceiling input side")
    parser.add_argument("--preset", default="demo", choices=sorted(config.PRESETS))
    args = parser.parse_args()
    thread_counts = sorted({int(t) for t in args.threads.split(",")})

    cfg = config.load(args.preset)
    set_track_meta(False)  # plain tensors out of MONAI, as in the pipeline's workers
    load_before = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        common.progress(f"synthetic discs ({args.patients} patients) and volumes "
                        f"({args.volumes})")
        cubes = common.synthetic_disc_cubes(args.patients, cfg.discs.cube_size,
                                            cfg.discs.cube_spacing_mm)
        volumes = segmentation_volumes(cfg, args.volumes, tmp)
        ceiling, autoencoder, inference = {}, [], []
        step_bf16 = cfg.autoencoder.bf16 and native_bf16("cpu")  # the step the config trains
        for threads in thread_counts:
            torch.set_num_threads(threads)
            common.progress(f"{threads} thread(s): ceilings")
            ceiling[threads] = ceilings(args.matmul_size, args.conv_size, args.repeats)
            for batch, bf16 in itertools.product((cfg.autoencoder.batch_size, args.large_batch),
                                                 sorted({False, step_bf16})):
                common.progress(f"{threads} thread(s): autoencoder step, batch {batch}, "
                                f"bf16 {bf16}")
                step = AutoencoderStep(cfg, cubes, batch, bf16)
                flops = step.counted_flops()["step"]
                seconds = seconds_per_call(step, args.repeats)
                autoencoder.append({"threads": threads, "batch": batch, "bf16": bf16,
                                    "gflop_per_step": flops / GIGA, "s_per_step": seconds,
                                    "discs_per_s": batch / seconds,
                                    "gflops": flops / seconds / GIGA})
            common.progress(f"{threads} thread(s): segmentation inference")
            inference += [inference_row(cfg, volumes, tmp, threads, max(2, args.repeats // 5),
                                        sw_batch)
                          for sw_batch in sorted({cfg.segmentation.inference_batch_size, 4})]
        main_threads = thread_counts[-1]
        torch.set_num_threads(main_threads)
        common.progress(f"{main_threads} thread(s): autoencoder phases and layers")
        step = AutoencoderStep(cfg, cubes, cfg.autoencoder.batch_size, step_bf16)
        phases = step.phases(args.repeats)
        layers = step.layers(args.repeats)
        common.progress("the paper preset's work per step and per window (counted, not timed)")
        paper = paper_work(config.paper().autoencoder.batch_size)

    for row in autoencoder + inference:
        limit = ceiling[row["threads"]]
        row["fraction_of_matmul"] = row["gflops"] / limit["matmul_gflops"]
        row["fraction_of_conv3d"] = row["gflops"] / limit["conv3d_gflops"]
    ceiling_rows = [{"threads": t, **c} for t, c in ceiling.items()]
    phase_rows = [{"phase": p, **v} for p, v in phases.items()]
    result = {"ceilings": ceiling_rows, "autoencoder_step": autoencoder,
              "autoencoder_phases": phase_rows, "autoencoder_layers": layers,
              "segmentation_inference": inference, "paper_preset_work": paper,
              "autoencoder": {"cube_size": cfg.discs.cube_size,
                              "channels": list(cfg.autoencoder.channels),
                              "bottleneck": cfg.autoencoder.bottleneck},
              "segmenter": {"model": cfg.segmentation.model,
                            "channels": list(cfg.segmentation.unet_channels),
                            "roi_size": list(cfg.segmentation.roi_size),
                            "overlap": cfg.segmentation.inference_overlap,
                            "volume_shapes": [list(v.shape) for v in volumes]},
              "preset": args.preset}
    print("\nceilings (GFLOP/s)")
    print(common.table(ceiling_rows))
    print("\nautoencoder training step")
    print(common.table(autoencoder))
    print(f"\nautoencoder step phases, batch {cfg.autoencoder.batch_size}, bf16 {step_bf16}, "
          f"{main_threads} thread(s) (elementwise work such as BatchNorm, ReLU and Adam counts no FLOPs)")
    print(common.table(phase_rows))
    print("\nautoencoder layers, forward")
    print(common.table(layers))
    print("\nsegmentation inference per volume")
    print(common.table(inference))
    print("\nthe paper preset's work (counted FLOPs; its time on a GPU is an estimate: see README)")
    print(common.table([paper]))
    common.write_result("flops", result, load_before, args)


if __name__ == "__main__":
    main()
