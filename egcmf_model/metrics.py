"""Segmentation metrics as the paper reports them, accumulated batch by batch (MONAI-style).

``update`` with each batch, ``aggregate`` for the numbers, ``reset`` before the next round: a
federated client reports the aggregated scalars, never the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .data.io import IGNORE_INDEX


class SegmentationMetrics:
    """Confusion-matrix metrics; ignored pixels excluded.

    Means (``dice``, ``miou``) are over the *annotated* classes: every class except one named
    ``background`` (the paper's paired data set annotates only in situ and invasive), and over
    those classes present in the ground truth or the prediction.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = tuple(classes)
        self.confusion = np.zeros((len(classes), len(classes)), np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, logits_or_labels: torch.Tensor, target: torch.Tensor) -> None:
        """``(B, K, H, W)`` logits or ``(B, H, W)`` labels, against ``(B, H, W)`` targets."""
        pred = logits_or_labels
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        valid = target != IGNORE_INDEX
        k = len(self.classes)
        index = target[valid].long() * k + pred[valid].long()
        counts = torch.bincount(index.cpu(), minlength=k * k).numpy()
        self.confusion += counts.reshape(k, k)

    def aggregate(self) -> dict[str, Any]:
        """``acc``, ``dice``, ``miou``, ``per_class`` {name: {dice, iou}} and ``confusion``
        (rows = truth, columns = prediction)."""
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = 2 * tp / (2 * tp + fp + fn)
            iou = tp / (tp + fp + fn)
        annotated = [i for i, name in enumerate(self.classes) if name != "background"]
        present = [i for i in annotated if not np.isnan(dice[i])]
        total = cm.sum()
        return {
            "acc": float(tp.sum() / total) if total else float("nan"),
            "dice": float(np.mean(dice[present])) if present else float("nan"),
            "miou": float(np.mean(iou[present])) if present else float("nan"),
            "per_class": {name: {"dice": _num(dice[i]), "iou": _num(iou[i])}
                          for i, name in enumerate(self.classes)},
            "confusion": self.confusion.tolist(),
        }


def selection_score(dice: float | None) -> float:
    """The validation Dice that picks the best model. Undefined Dice (NaN or None: no annotated
    class in the truth nor in the prediction, nothing to find and nothing found) scores 1."""
    return 1.0 if dice is None or dice != dice else float(dice)


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
