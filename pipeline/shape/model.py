"""The disc-shape autoencoder of the published method, its reconstruction IoU and its checkpoints.

Architecture (REFERENCE.md "Autoencoder"), scaled by cube size, channel widths and bottleneck:
- encoder: one Conv3d(k3, s2, p1) + BatchNorm + ReLU stage per channel width, each halving the
  cube; flatten; Linear to the latent code (no activation);
- decoder: the mirror image: Linear, unflatten, ConvTranspose3d(k3, s2, p1, output_padding 1)
  + BatchNorm + ReLU stages, the last one to a single channel; no skip connections.
The paper ends the decoder in a sigmoid and trains with BCE. `forward` returns the logits
before that sigmoid because BCEWithLogitsLoss is the numerically stable form of sigmoid + BCE;
`reconstruct` applies the sigmoid for outputs, and a probability of 0.5 is a logit of 0.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from pipeline import stats
from pipeline.data import checkpoints, storage

PAPER_CHANNELS = (32, 64, 128, 256, 512)


class DiscAutoencoder(nn.Module):
    """Binary disc cube (B, 1, S, S, S) -> latent code (B, bottleneck) -> logits (B, 1, S, S, S).

    Args:
        cube_size: S, the cube's edge in voxels; divisible by 2 ** len(channels).
        channels: encoder widths, one stride-2 stage each (paper: 32, 64, 128, 256, 512 on 64³,
            so the flattened code is 512 · 2³ = 4096).
        bottleneck: length of the latent code.
    """

    def __init__(self, cube_size: int, channels: Sequence[int], bottleneck: int):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be positive widths, one per stage; got {channels}")
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be at least 1; got {bottleneck}")
        stages = len(channels)
        if cube_size < 2**stages or cube_size % 2**stages:
            raise ValueError(
                f"cube size {cube_size} must be a multiple of 2**{stages} = {2**stages}: "
                f"each of the {stages} encoder stages halves the cube"
            )
        self.cube_size = int(cube_size)
        self.channels = channels
        self.bottleneck = int(bottleneck)
        self.code_shape = (channels[-1],) + (cube_size // 2**stages,) * 3

        encoder: list[nn.Module] = []
        for c_in, c_out in zip((1,) + channels[:-1], channels, strict=True):
            encoder += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm3d(c_out),
                        nn.ReLU(inplace=True)]
        flat = math.prod(self.code_shape)
        self.encoder = nn.Sequential(*encoder, nn.Flatten(), nn.Linear(flat, bottleneck))

        decoder: list[nn.Module] = [nn.Linear(bottleneck, flat), nn.Unflatten(1, self.code_shape)]
        widths = channels[::-1]
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            decoder += [UpConv3d(c_in, c_out), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
        decoder.append(UpConv3d(widths[-1], 1))
        self.decoder = nn.Sequential(*decoder)
        # Channels-last weights: oneDNN's 3D (transposed) convolutions run a training step
        # 1.3-1.5x faster in that layout on CPU (bench/flops.py); the function is unchanged.
        self.to(memory_format=torch.channels_last_3d)

    @property
    def architecture(self) -> dict:
        """Everything needed to rebuild the model (stored in a checkpoint's meta.json)."""
        return {"cube_size": self.cube_size, "channels": list(self.channels),
                "bottleneck": self.bottleneck}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the reconstructed cube."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's output: voxel probabilities after the final sigmoid."""
        return torch.sigmoid(self(x))


# The 2-tap kernel of each output phase of a stride-2, kernel-3, padding-1 transposed convolution
# along one axis: output 2m takes w[1]·x[m]; output 2m+1 takes w[2]·x[m] + w[0]·x[m+1]. Tap index
# 3 is a zero.
_PHASE_TAPS = torch.tensor([[1, 3], [2, 0]])


def _sub_pixel_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A transposed convolution's weight (in, out, 3, 3, 3) -> the stride-1 convolution kernel
    (out·8, in, 2, 2, 2) that computes its 8 output phases, out-channel major."""
    c_in, c_out = weight.shape[:2]
    taps = functional.pad(weight, (0, 1, 0, 1, 0, 1))  # index 3: the zero tap
    d, h, w = (_PHASE_TAPS.view(shape) for shape in
               ((2, 1, 1, 2, 1, 1), (1, 2, 1, 1, 2, 1), (1, 1, 2, 1, 1, 2)))
    kernel = taps[:, :, d, h, w]  # in, out, phase d, h, w, tap d, h, w
    return kernel.permute(1, 2, 3, 4, 0, 5, 6, 7).reshape(c_out * 8, c_in, 2, 2, 2)


def _sub_pixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The transposed convolution as one stride-1 convolution to its 8 output phases, then
    their interleaving."""
    (batch, _, *size), c_out = x.shape, weight.shape[1]
    phases = functional.conv3d(functional.pad(x, (0, 1, 0, 1, 0, 1)), _sub_pixel_kernel(weight),
                               bias.repeat_interleave(8))
    return (phases.reshape(batch, c_out, 2, 2, 2, *size)
            .permute(0, 1, 5, 2, 6, 3, 7, 4)
            .reshape(batch, c_out, *(2 * s for s in size)))


class _UpConv(torch.autograd.Function):
    """The decoder's transposed convolution with the CPU paths of UpConv3d: gradients are
    exactly nn's (oneDNN's own backward for input and weight; the bias's a plain sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                sub_pixel: bool) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # cast once, and keep the cast for backward
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight)
        if sub_pixel:
            return _sub_pixel(x, weight, bias)
        return functional.conv_transpose3d(x, weight, bias, stride=2, padding=1, output_padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x.to(grad.dtype), weight.to(grad.dtype), None, [2] * 3, [1] * 3, [1] * 3,
            True, [1] * 3, 1, [needs_x, needs_weight, False])
        grad_bias = grad.sum((0, 2, 3, 4), dtype=torch.promote_types(grad.dtype, torch.float32)) \
            if needs_bias else None
        return grad_x, grad_weight, grad_bias, None


class UpConv3d(nn.ConvTranspose3d):
    """nn.ConvTranspose3d(kernel 3, stride 2, padding 1, output_padding 1): the same layer,
    parameters, state_dict and gradients, with two CPU paths that oneDNN makes slow (a batch-16
    step of the demo autoencoder, 1 thread: ~65 ms, of which these saved ~10):
    - a layer to a single output channel (the decoder's last, at full resolution) runs its
      forward pass as a sub-pixel convolution: oneDNN's own ran at ~5 GFLOP/s, and one
      convolution to the 8 output phases does 2.4x its multiply-adds in a third of the time;
    - the bias gradient is a plain sum: oneDNN's, in bf16, took as long as the input and weight
      gradients together.
    Elsewhere (GPUs) it is nn's.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if x.device.type != "cpu" or output_size is not None:
            return super().forward(x, output_size)
        return _UpConv.apply(x, self.weight, self.bias, self.out_channels == 1)


def as_input(cubes: torch.Tensor | np.ndarray, device: torch.device | str | None = None
             ) -> torch.Tensor:
    """(N, S, S, S) uint8/bool cubes -> (N, 1, S, S, S) float32 model input (channels-last, as
    the model's weights are)."""
    cubes = torch.as_tensor(cubes)
    if cubes.ndim != 4:
        raise ValueError(f"expected cubes shaped (N, S, S, S); got {tuple(cubes.shape)}")
    x = (cubes.to(device) > 0).to(torch.float32).unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last_3d)


def disc_iou(output: torch.Tensor, target: torch.Tensor, threshold: float = 0.5,
             logits: bool = False) -> torch.Tensor:
    """Per-disc IoU (N,) between the thresholded output and the binary target.

    `output` holds probabilities, or logits when `logits=True` (thresholded at the logit of
    `threshold`, the same decision). A disc empty in both counts as a perfect 1.
    """
    if output.shape[0] != target.shape[0] or output.numel() != target.numel():
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ")
    cut = math.log(threshold / (1 - threshold)) if logits else threshold
    pred = (output > cut).reshape(output.shape[0], -1)
    true = (target > 0.5).reshape(target.shape[0], -1)
    inter = (pred & true).sum(1).to(torch.float64)
    union = (pred | true).sum(1).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_summary(epoch_ious: Sequence[float] | np.ndarray, groups=None
                ) -> tuple[float, float, float]:
    """Mean per-disc IoU and its 95% CI. With `groups` (the patient of each disc) the CI
    resamples patients, as every CI of the project does (a spine's discs are not independent);
    without, over discs (normal approximation, capped at 1)."""
    ious = np.asarray(epoch_ious, dtype=np.float64)
    if ious.size == 0:
        raise ValueError("no per-disc IoUs: the epoch saw no training discs")
    if groups is not None:
        estimate = stats.mean_ci(ious, groups=groups)
        return estimate.value, estimate.ci_low, estimate.ci_high
    mean = float(ious.mean())
    half = 1.96 * float(ious.std(ddof=1)) / math.sqrt(ious.size) if ious.size > 1 else 0.0
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def has_converged(epoch_ious: Sequence[float] | np.ndarray, target: float) -> bool:
    """Converged when the mean IoU over ALL training discs of an epoch reaches `target`.

    `epoch_ious` holds one IoU per training disc, from an eval-mode pass over the whole training
    set. (The published code declared convergence on the first batch above 0.995.)
    """
    return iou_summary(epoch_ious)[0] >= target


def plateaued(epoch_mean_ious: Sequence[float], patience: int, min_delta: float) -> bool:
    """True when the best whole-epoch mean IoU has not risen by `min_delta` in the last
    `patience` epochs: a trial that is not getting closer to the target (early stopping)."""
    if patience < 1 or len(epoch_mean_ious) <= patience:
        return False
    best_before = max(epoch_mean_ious[:-patience])
    return max(epoch_mean_ious[-patience:]) < best_before + min_delta


def out_of_reach(epoch_mean_ious: Sequence[float], window: int, remaining: int,
                 target: float) -> bool:
    """True when the best whole-epoch mean IoU, still rising at its pace of the last `window`
    measurements, would stay below `target` after `remaining` more. Sound only in the tail of a
    decaying learning rate, where the pace can only slow (a sweep's k=3 gained 0.0077, 0.0051,
    0.0032, 0.0024, 0.0013, 0.0003 per 20 epochs from epoch 260 of 400)."""
    if window < 1 or len(epoch_mean_ious) <= window:
        return False
    best = max(epoch_mean_ious)
    pace = (best - max(epoch_mean_ious[:-window])) / window
    return best + pace * remaining < target


def save_checkpoint(directory: str, model: nn.Module, meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> str:
    """Write an autoencoder checkpoint: its meta.json carries the architecture beside `meta`."""
    architecture = getattr(model, "module", model).architecture  # unwrap DistributedDataParallel
    return checkpoints.write(directory, model, {"architecture": architecture, **meta}, optimizer)


def load_model(checkpoint_dir: str) -> tuple[DiscAutoencoder, dict]:
    """Rebuild the autoencoder of a checkpoint folder in eval mode; returns (model, meta)."""
    meta = checkpoints.read_meta(checkpoint_dir, "autoencoder")
    if "architecture" not in meta:
        raise ValueError(f"{checkpoint_dir}/{checkpoints.META_FILE} has no 'architecture' entry")
    model = DiscAutoencoder(**meta["architecture"])
    model.load_state_dict(checkpoints.read_state(checkpoint_dir))
    return model.eval(), meta


def model_id(checkpoint_dir: str) -> str:
    """A short content hash of model.pt: which weights produced a latent table."""
    data = storage.read_bytes(storage.join(str(checkpoint_dir), checkpoints.MODEL_FILE))
    return hashlib.sha256(data).hexdigest()[:16]
