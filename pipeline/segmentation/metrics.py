"""Overlap scores of a predicted disc mask against its reference, shared by training (model
selection) and inference (the per-series table), so both score the same way."""

from __future__ import annotations

import numpy as np


def dice_iou(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks; both empty counts as perfect agreement."""
    predicted, target = np.asarray(predicted, dtype=bool), np.asarray(target, dtype=bool)
    intersection = float(np.count_nonzero(predicted & target))
    total = float(np.count_nonzero(predicted)) + float(np.count_nonzero(target))
    if total == 0:
        return 1.0, 1.0
    return 2 * intersection / total, intersection / (total - intersection)
