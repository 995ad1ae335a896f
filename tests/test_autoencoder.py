"""The autoencoder's shapes for both presets, its IoU and convergence rules, and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.shape.model import (
    PAPER_CHANNELS,
    DiscAutoencoder,
    UpConv3d,
    disc_iou,
    has_converged,
    iou_summary,
    load_model,
    model_id,
    out_of_reach,
    plateaued,
    save_checkpoint,
)
from tests.disc_cubes import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _forward_backward(model: DiscAutoencoder, batch: int) -> torch.Tensor:
    x = (torch.rand(batch, 1, *(model.cube_size,) * 3) > 0.7).float()
    logits = model(x)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, x).backward()
    assert logits.shape == x.shape
    first_conv = model.encoder[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    return logits


def test_paper_preset_is_the_published_architecture():
    cfg = config.paper()
    model = DiscAutoencoder(cfg.discs.cube_size, cfg.autoencoder.channels, 4)
    assert cfg.discs.cube_size == 64 and tuple(cfg.autoencoder.channels) == PAPER_CHANNELS
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 512]
    assert all(c.kernel_size == (3,) * 3 and c.stride == (2,) * 3 and c.padding == (1,) * 3
               for c in convs)
    assert model.encoder[-1].in_features == 4096  # 512 · 2³
    assert model.decoder[0].out_features == 4096
    transposed = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose3d)]
    assert [t.out_channels for t in transposed] == [256, 128, 64, 32, 1]
    assert all(t.output_padding == (1,) * 3 for t in transposed)
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.encoder) == 5
    _forward_backward(model, batch=2)
    assert model.encode(torch.zeros(3, 1, 64, 64, 64)).shape == (3, 4)


def test_demo_preset_shapes_and_sigmoid_output():
    cfg = config.demo()
    model = DiscAutoencoder(cfg.discs.cube_size, cfg.autoencoder.channels,
                            cfg.autoencoder.bottleneck)
    _forward_backward(model, batch=3)
    model.eval()
    x = torch.zeros(2, 1, *(cfg.discs.cube_size,) * 3)
    z = model.encode(x)
    assert z.shape == (2, cfg.autoencoder.bottleneck)
    assert model.decode(z).shape == x.shape
    probs = model.reconstruct(x)
    assert torch.allclose(probs, torch.sigmoid(model(x)))
    assert probs.min() >= 0 and probs.max() <= 1


@pytest.mark.parametrize("c_in, c_out", [(16, 1), (3, 2)])
def test_up_convolution_is_the_transposed_convolution(c_in, c_out):
    """Same output and same gradients as nn.ConvTranspose3d with the same weights, in float64
    on an input of three different sides; and the same state_dict, so checkpoints load."""
    torch.manual_seed(0)
    fast = UpConv3d(c_in, c_out).double()
    plain = torch.nn.ConvTranspose3d(c_in, c_out, 3, stride=2, padding=1,
                                     output_padding=1).double()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, c_in, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    out, expected = fast(x), plain(x)
    assert out.shape == (2, c_out, 10, 12, 14)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, fast.weight, fast.bias), grad)
    want = torch.autograd.grad(expected, (x, plain.weight, plain.bias), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_bf16_training_step_matches_float32_closely():
    """The decoder's up-convolutions under bf16 autocast (the training steps) stay within bf16
    rounding of the float32 model, and their weight gradients come back float32."""
    torch.manual_seed(0)
    model = DiscAutoencoder(32, (8, 16, 32, 64), 4)
    x = (torch.rand(2, 1, 32, 32, 32) > 0.6).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).float()
    low.mean().backward()
    assert model.decoder[-1].weight.grad.dtype == torch.float32
    torch.testing.assert_close(low, model(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("cube_size, channels, bottleneck, message", [
    (48, PAPER_CHANNELS, 4, "multiple of 2\\*\\*5"),
    (16, PAPER_CHANNELS, 4, "multiple of 2\\*\\*5"),
    (32, (), 4, "channels"),
    (32, (8, 0), 4, "channels"),
    (32, (8, 16), 0, "bottleneck"),
])
def test_bad_architecture_is_a_clear_error(cube_size, channels, bottleneck, message):
    with pytest.raises(ValueError, match=message):
        DiscAutoencoder(cube_size, channels, bottleneck)


def test_disc_iou_on_hand_made_masks():
    target = torch.zeros(3, 1, 4, 4, 4)
    target[0, 0, :2] = 1  # 32 voxels
    target[1, 0, 0, 0, 0] = 1
    probs = torch.zeros_like(target)
    probs[0, 0, :1] = 0.9  # 16 of the 32, nothing extra
    probs[0, 0, 3, 3, 3] = 0.6  # and one false positive
    probs[1, 0, 0, 0, 0] = 0.4  # below the threshold: a miss
    ious = disc_iou(probs, target)
    assert ious.tolist() == pytest.approx([16 / 33, 0.0, 1.0])  # disc 2: empty in both
    assert float(ious.mean()) == pytest.approx((16 / 33 + 1.0) / 3)
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    assert disc_iou(logits, target, logits=True).tolist() == pytest.approx(ious.tolist())
    assert disc_iou(probs, target, threshold=0.95).tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_convergence_is_judged_on_the_whole_epoch_mean():
    # The published code stopped on the first batch above the target: here the first discs
    # are perfect but the epoch's mean over all discs is not.
    first_batch_perfect = [1.0, 1.0, 1.0, 1.0, 0.97]
    assert not has_converged(first_batch_perfect, 0.995)
    assert has_converged([0.999, 0.996, 0.995], 0.995)
    assert has_converged(np.full(10, 0.9951), 0.995)
    with pytest.raises(ValueError, match="no per-disc IoUs"):
        has_converged([], 0.995)
    mean, low, high = iou_summary([0.90, 0.95, 1.0, 0.97])
    assert low < mean < high <= 1.0 and mean == pytest.approx(0.955)


def test_plateau_rule():
    rising = list(np.linspace(0.5, 0.9, 30))
    assert not plateaued(rising, patience=10, min_delta=0.001)
    flat = rising + [0.9] * 10
    assert plateaued(flat, patience=10, min_delta=0.001)
    oscillating = rising + [0.7, 0.8] * 5  # the paper's bottleneck 3: 0.6-0.8, never better
    assert plateaued(oscillating, patience=10, min_delta=0.001)
    assert not plateaued([0.5] * 10, patience=10, min_delta=0.001)  # too short to judge


def test_out_of_reach_rule():
    # a demo sweep's k=3 in the tail of its schedule, every 20 epochs from epoch 260 of 400
    tail = [0.9670, 0.9747, 0.9798, 0.9830, 0.9854]
    assert out_of_reach(tail, window=2, remaining=3, target=0.995)  # +0.0056 per 2: 0.9938
    assert not out_of_reach(tail[:3], window=2, remaining=5, target=0.995)  # still on course
    on_course = [0.980, 0.984, 0.988, 0.992]  # +0.004 a step: reaches 0.995 in one more
    assert not out_of_reach(on_course, window=2, remaining=1, target=0.995)
    assert out_of_reach(on_course, window=2, remaining=0, target=0.995)  # no epochs left
    assert not out_of_reach(tail[:2], window=2, remaining=3, target=0.995)  # too short
    dip = tail[:3] + [0.9700]  # a worse last epoch: the pace is the best's, not the last's
    assert out_of_reach(dip, window=1, remaining=5, target=0.995)
    assert not out_of_reach(dip, window=3, remaining=5, target=0.995)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DiscAutoencoder(16, (4, 8), 3)
    with torch.no_grad():
        model(torch.rand(4, 1, 16, 16, 16))  # moves BatchNorm running stats off their init
    model.eval()
    save_checkpoint(str(tmp_path / "a"), model, {"epoch": 7, "mean_iou": 0.5})
    loaded, meta = load_model(str(tmp_path / "a"))
    assert meta["epoch"] == 7 and meta["architecture"] == model.architecture
    assert not loaded.training
    x = torch.rand(2, 1, 16, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert model_id(str(tmp_path / "a")) == model_id(str(tmp_path / "a"))
    with torch.no_grad():
        model.encoder[0].weight.add_(1)
    save_checkpoint(str(tmp_path / "b"), model, {})
    assert model_id(str(tmp_path / "b")) != model_id(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="not an autoencoder checkpoint"):
        load_model(str(tmp_path))
