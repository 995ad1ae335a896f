"""The segmenters build, train a step, refuse bad settings, and round-trip through a checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import SegmentationConfig
from pipeline.data import checkpoints
from pipeline.segmentation import models as segmodels


def test_swinunetr_v2_forward_and_backward_on_a_tiny_input():
    cfg = SegmentationConfig(model="swinunetr", feature_size=12, roi_size=(64, 32, 32))
    model = segmodels.build_segmenter(cfg)
    assert model.swinViT.use_v2 and len(model.swinViT.layers1c) == 1  # V2: residual conv blocks
    x = torch.randn(1, 1, 64, 32, 32)
    logits = model(x)
    assert logits.shape == (1, 1, 64, 32, 32)
    logits.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_unet_gives_one_logit_channel():
    cfg = SegmentationConfig(model="unet", unet_channels=(4, 8, 16), roi_size=(16, 32, 32))
    model = segmodels.build_segmenter(cfg)
    assert model(torch.randn(2, 1, 16, 32, 32)).shape == (2, 1, 16, 32, 32)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "vnet"}, "unknown segmentation model"),
        ({"model": "swinunetr", "feature_size": 16, "roi_size": (64, 64, 64)}, "multiple of 12"),
        ({"model": "swinunetr", "roi_size": (48, 64, 64)}, "multiples of 32"),
        ({"model": "swinunetr", "roi_size": (32, 32, 32)}, "bottleneck"),
        ({"model": "unet", "unet_channels": (8, 16, 32), "roi_size": (30, 64, 64)}, "multiples of 4"),
        ({"model": "unet", "unet_channels": (8,), "roi_size": (32, 64, 64)}, "at least two"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(changes, message):
    with pytest.raises(ValueError, match=message):
        segmodels.build_segmenter(dataclasses.replace(SegmentationConfig(), **changes))


def test_checkpoint_round_trip_rebuilds_the_same_network(tmp_path):
    cfg = SegmentationConfig(model="unet", unet_channels=(4, 8, 16), roi_size=(16, 32, 32))
    model = segmodels.build_segmenter(cfg).eval()
    meta = {"segmentation": dataclasses.asdict(cfg), "epoch": 3}
    checkpoints.write(str(tmp_path), model, meta)
    loaded, loaded_meta = segmodels.load_segmenter(str(tmp_path))
    assert loaded_meta["epoch"] == 3
    assert segmodels.config_from_meta(loaded_meta) == cfg
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="not a segmenter checkpoint"):
        segmodels.load_segmenter(str(tmp_path / "nowhere"))
