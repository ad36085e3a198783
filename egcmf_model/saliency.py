"""Grad-CAM saliency computed inline, and the key-region window search.

No module hooks, no ``zero_grad()`` and no ``backward()``: the CAM is the gradient of the summed
tumour logits with respect to a *detached* copy of the last decoder features, with the head
applied functionally on detached weights. The training graph, the parameters' ``.grad`` and
Opacus's per-sample hooks are never touched (SPEC, "Pitfalls").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grad_cam(features: torch.Tensor, head: nn.Conv2d, classes: list[int]) -> torch.Tensor:
    """Saliency in [0, 1] for the ``classes`` logits of a 1x1 ``head``.

    Args:
        features: ``(B, C, H, W)`` last decoder features (any graph; detached here).
        head: the 1x1 conv that maps them to logits.
        classes: class ids whose logits are summed into the score.

    Returns:
        ``(B, H, W)`` saliency, each sample min-max normalised (zeros where flat).
    """
    with torch.enable_grad():
        feats = features.detach().requires_grad_(True)
        bias = None if head.bias is None else head.bias.detach()
        logits = F.conv2d(feats, head.weight.detach(), bias)
        score = logits[:, classes].sum()
        (grads,) = torch.autograd.grad(score, feats)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1) channel importances
    cam = F.relu((weights * feats.detach()).sum(dim=1))  # (B, H, W)
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))


def window_search(saliency: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Top-left corner of the ``window`` x ``window`` box of highest mean saliency.

    Args:
        saliency: ``(B, H, W)``.
        window: box side in pixels; stride: search step in pixels.

    Returns:
        ``(B, 4)`` long boxes ``(y0, x0, y1, x1)``, end-exclusive; first maximum on ties.
    """
    means = F.avg_pool2d(saliency.unsqueeze(1), window, stride).squeeze(1)  # (B, ny, nx)
    flat = means.flatten(1).argmax(dim=1)
    y0 = torch.div(flat, means.shape[-1], rounding_mode="floor") * stride
    x0 = flat % means.shape[-1] * stride
    return torch.stack([y0, x0, y0 + window, x0 + window], dim=1).long()


def centre_box(batch: int, size: tuple[int, int], window: int, device: torch.device
               ) -> torch.Tensor:
    """``(B, 4)`` centred boxes: the concentric zoom of the ``mrcfm`` ablation."""
    y0, x0 = (size[0] - window) // 2, (size[1] - window) // 2
    box = torch.tensor([y0, x0, y0 + window, x0 + window], device=device)
    return box.expand(batch, 4).clone()


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """Crop ``(B, C, H, W)`` (or ``(B, H, W)``) at ``boxes * scale``; all boxes the same size."""
    crops = [x[b, ..., y0 * scale : y1 * scale, x0 * scale : x1 * scale]
             for b, (y0, x0, y1, x1) in enumerate(boxes.tolist())]
    return torch.stack(crops)
