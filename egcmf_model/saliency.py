"""Grad-CAM saliency computed inline, and the key-region window search.

The CAM reads a semantic level of the target decoder (stride 4 by default: ``model.cam_stride``)
and scores the summed tumour-class *probability* at the output: the gradient then varies from
pixel to pixel, unlike a CAM of raw logits behind a 1x1 head, which is the logit map itself, and
logits are only defined up to a per-pixel shift under softmax.

No module hooks, no ``zero_grad()`` and no ``backward()``: the gradient is taken with
``torch.autograd.grad`` with respect to a *detached* copy of the features, through the rest of
the decoder and the head applied functionally on detached weights (``frozen`` methods). The
training graph, the parameters' ``.grad``, BatchNorm's running statistics and Opacus's
per-sample hooks are never touched (SPEC, "Pitfalls").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def grad_cam(features: torch.Tensor, tail: Callable[[torch.Tensor], torch.Tensor],
             classes: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Grad-CAM of the summed probability of ``classes``, in [0, 1].

    Args:
        features: ``(B, C, h, w)`` features of a decoder level (any graph; detached here).
        tail: maps such features to logits ``(B, K, H, W)``; it must use detached weights and
            call no module (see ``ConvNormAct.frozen``).
        classes: class ids whose softmax probabilities, summed over pixels, are the score.
        size: ``(H, W)`` of the returned map (bilinear upsampling).

    Returns:
        ``(B, H, W)`` saliency, each sample min-max normalised; all zeros where it is flat.
    """
    with torch.inference_mode(False), torch.enable_grad():  # also under inference_mode()
        feats = features.detach().clone().requires_grad_(True)
        probs = tail(feats).softmax(dim=1)
        (grads,) = torch.autograd.grad(probs[:, list(classes)].sum(), feats)
        weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1) channel importances
        cam = F.relu((weights * feats.detach()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        low = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - low
        return torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))


def window_size(height: int, width: int, fraction: float) -> int:
    """Side of the key-region window: ``fraction`` of the shorter side (128 px at 512), rounded
    to a multiple of 8 so that its 40x crop suits the detail VGG-UNet and MRFM's stride 2."""
    return max(8, round(min(height, width) * fraction / 8) * 8)


def search_stride(height: int, width: int, fraction: float) -> int:
    """Step of the window search: ``fraction`` of the shorter side (H/16), even, at least 2."""
    return max(2, round(min(height, width) * fraction / 2) * 2)


def window_search(saliency: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Top-left corner of the ``window`` x ``window`` box of highest mean saliency.

    Args:
        saliency: ``(B, H, W)``.
        window: box side in pixels; stride: search step in pixels.

    Returns:
        ``(B, 4)`` long boxes ``(y0, x0, y1, x1)``, end-exclusive; first maximum on ties.
    """
    means = window_means(saliency, window, stride)  # (B, ny, nx)
    flat = means.flatten(1).argmax(dim=1)
    y0 = torch.div(flat, means.shape[-1], rounding_mode="floor") * stride
    x0 = flat % means.shape[-1] * stride
    return torch.stack([y0, x0, y0 + window, x0 + window], dim=1).long()


def window_means(saliency: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """``(B, ny, nx)`` mean of every ``window`` x ``window`` box at steps of ``stride``.

    Every box is a union of g x g blocks on the grid of g = gcd(window, stride), so the box
    means are the means of the block means, up to rounding: each pixel is read once, where
    pooling with the box itself reads it (window / stride)^2 times, one box per GPU thread
    (2.8 ms per step at the paper's 512 px on an H100).
    """
    g = math.gcd(window, stride)
    blocks = F.avg_pool2d(saliency.unsqueeze(1), g)
    return F.avg_pool2d(blocks, window // g, stride // g).squeeze(1)


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
