"""Eq. 7-9: L = L_seg + gamma * L_edge, with the ignore label respected everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import determinism
from .data.io import IGNORE_INDEX
from .he_branch import ZOOM
from .saliency import crop_boxes


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss, mean over classes.

    Args:
        logits: ``(B, K, H, W)``; target: ``(B, H, W)`` class ids, ``IGNORE_INDEX`` excluded.
    """
    valid = (target != IGNORE_INDEX).unsqueeze(1)  # (B, 1, H, W)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid  # (B, K, H, W)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()


def binary_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                     eps: float = 1.0) -> torch.Tensor:
    """One-channel Dice loss: ``logits (B, 1, H, W)``; ``target``, ``valid`` ``(B, H, W)``."""
    probs = torch.sigmoid(logits[:, 0]) * valid
    target = target * valid
    return 1.0 - (2 * (probs * target).sum() + eps) / (probs.sum() + target.sum() + eps)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over non-ignored pixels; zero (with a graph) when none is labelled."""
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    if determinism.wanted(logits):  # CUDA's 2-D NLL kernel is not deterministic
        return determinism.cross_entropy(logits, target, IGNORE_INDEX)
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class EGCMFLoss:
    """``L_seg = 0.5 Dice(P) + 0.5 CE(P) + 0.5 CE(P_high)``;
    ``L_edge = 0.5 CE(Y_sem) + 0.5 Dice(Y_edge)``; ``L = L_seg + gamma L_edge``.

    Where a fusion head makes P (``mrfm+edm``, ``full``), ``0.5 CE(P_aim)`` of the target branch
    joins L_seg: eq. 7 puts L_aim on the target branch, and Grad-CAM reads its head, which would
    otherwise never learn. Terms whose outputs a variant does not produce are left out."""

    gamma: float = 0.5

    def __call__(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["mask"]
        seg = 0.5 * dice_loss(out["logits"], mask) + 0.5 * cross_entropy(out["logits"], mask)
        parts = {"seg": seg}
        if "logits_high" in out:
            high_target = crop_boxes(batch["mask_40x"], out["boxes"], ZOOM)  # (B, H, W) at 40x
            parts["high"] = cross_entropy(out["logits_high"], high_target)
            seg = seg + 0.5 * parts["high"]
        if "logits_aim" in out:
            parts["aim"] = cross_entropy(out["logits_aim"], mask)
            seg = seg + 0.5 * parts["aim"]
        total = seg
        if "sem" in out:
            valid = (mask != IGNORE_INDEX).to(out["edge"].dtype)
            edge = 0.5 * cross_entropy(out["sem"], mask) + 0.5 * binary_dice_loss(
                out["edge"], batch["edge_target"], valid)
            parts["edge"] = edge
            total = seg + self.gamma * edge
        return total, {k: float(v.detach()) for k, v in {**parts, "loss": total}.items()}
