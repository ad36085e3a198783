"""Eq. 7-9: L = L_seg + gamma * L_edge, with the ignore label respected everywhere.

Every loss function takes ``per_sample``: False pools each sum over the whole batch (one Dice,
one CE over all pixels), True computes the term for each sample alone and returns ``(B,)``.
DP-SGD needs the second: with pooled sums, sample *i*'s gradient depends on the other samples
of its batch, and per-sample clipping no longer bounds one example's influence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.io import IGNORE_INDEX
from .he_branch import ZOOM
from .saliency import crop_boxes


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
              per_sample: bool = False) -> torch.Tensor:
    """Soft multi-class Dice loss, mean over classes.

    Args:
        logits: ``(B, K, H, W)``; target: ``(B, H, W)`` class ids, ``IGNORE_INDEX`` excluded.

    Returns:
        a scalar, or ``(B,)`` with ``per_sample``.
    """
    valid = (target != IGNORE_INDEX).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid  # (B, K, H, W)
    dims = (2, 3) if per_sample else (0, 2, 3)
    inter = (probs * onehot).sum(dim=dims)  # (B, K) or (K,)
    total = probs.sum(dim=dims) + onehot.sum(dim=dims)
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean(dim=-1)


def binary_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                     eps: float = 1.0, per_sample: bool = False) -> torch.Tensor:
    """One-channel Dice loss: ``logits (B, 1, H, W)``; ``target``, ``valid`` ``(B, H, W)``.
    A scalar, or ``(B,)`` with ``per_sample``."""
    probs = torch.sigmoid(logits[:, 0]) * valid
    target = target * valid
    dims = (1, 2) if per_sample else (0, 1, 2)
    inter = (probs * target).sum(dim=dims)
    return 1.0 - (2 * inter + eps) / (probs.sum(dim=dims) + target.sum(dim=dims) + eps)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                  per_sample: bool = False) -> torch.Tensor:
    """Cross-entropy over non-ignored pixels; zero (with a graph) when none is labelled.

    ``per_sample``: ``(B,)``, each sample's mean over its own labelled pixels, so that the
    normaliser does not depend on how many pixels the other samples label.
    """
    if per_sample:
        pixels = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        labelled = (target != IGNORE_INDEX).flatten(1).sum(dim=1)  # (B,)
        return pixels.flatten(1).sum(dim=1) / labelled.clamp_min(1)
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class EGCMFLoss:
    """``L_seg = 0.5 Dice(P) + 0.5 CE(P) + 0.5 CE(P_high)``;
    ``L_edge = 0.5 CE(Y_sem) + 0.5 Dice(Y_edge)``; ``L = L_seg + gamma L_edge``.

    Where a fusion head makes P (``mrfm+edm``, ``full``), ``0.5 CE(P_aim)`` of the target branch
    joins L_seg: eq. 7 puts L_aim on the target branch, and Grad-CAM reads its head, which would
    otherwise never learn. Terms whose outputs a variant does not produce are left out.

    With ``per_sample`` every term is computed per sample and the loss is their mean over the
    batch: ``loss(batch) == mean(loss(sample))``, as DP-SGD requires."""

    gamma: float = 0.5
    per_sample: bool = False  # see the class docstring; DP-SGD training sets it

    def __call__(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        mask, each = batch["mask"], self.per_sample

        def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return cross_entropy(logits, target, each).mean()

        seg = 0.5 * dice_loss(out["logits"], mask, per_sample=each).mean() + 0.5 * ce(
            out["logits"], mask)
        parts = {"seg": seg}
        if "logits_high" in out:
            high_target = crop_boxes(batch["mask_40x"], out["boxes"], ZOOM)  # (B, H, W) at 40x
            parts["high"] = ce(out["logits_high"], high_target)
            seg = seg + 0.5 * parts["high"]
        if "logits_aim" in out:
            parts["aim"] = ce(out["logits_aim"], mask)
            seg = seg + 0.5 * parts["aim"]
        total = seg
        if "sem" in out:
            valid = (mask != IGNORE_INDEX).to(out["edge"].dtype)
            edge = 0.5 * ce(out["sem"], mask) + 0.5 * binary_dice_loss(
                out["edge"], batch["edge_target"], valid, per_sample=each).mean()
            parts["edge"] = edge
            total = seg + self.gamma * edge
        return total, {k: float(v.detach()) for k, v in {**parts, "loss": total}.items()}
