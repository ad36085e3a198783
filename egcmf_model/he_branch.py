"""H&E semantic branch: target VGG-UNet at 10x, detail VGG-UNet on the 40x key region, MRFM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvNormAct, SqueezeExcitation
from .config import ModelConfig
from .saliency import centre_box, crop_boxes, grad_cam, search_stride, window_search, window_size
from .vgg_unet import LEVELS, VGGUNet

R_AIM, R_HIGH = 1.0, 0.25  # µm/px of the target (10x) and detail (40x) inputs
ZOOM = 4  # R_AIM / R_HIGH: a 10x box of side H/4 is H pixels at 40x
TARGET_STRIDE = 2  # target decoder level that receives the detail features
DETAIL_STRIDE = 8  # detail decoder level whose sampling resolution matches it
CAM_STRIDES = (8, 4, 2)  # target decoder levels Grad-CAM may read: those before MRFM


def level_index(stride: int) -> int:
    """Decoder levels run at strides 8, 4, 2, 1 (coarse to fine)."""
    return LEVELS - stride.bit_length()


# Eq. 1-2: fuse where SRF_aim / SRF_high = 1, i.e. target stride * r_aim == detail stride * r_high.
assert TARGET_STRIDE * R_AIM == DETAIL_STRIDE * R_HIGH, "MRFM levels violate eq. 1-2"


class MRFM(nn.Module):
    """Multi-resolution fusion: SE + 1x1 on detail features, added into the key-region box of the
    target features, smoothed by a 3x3 conv; the rest of the target map is left as it was."""

    def __init__(self, c_detail: int, c_target: int, reduction: int, norm: str) -> None:
        super().__init__()
        self.se = SqueezeExcitation(c_detail, reduction)
        self.project = nn.Conv2d(c_detail, c_target, 1)
        self.smooth = ConvNormAct(c_target, c_target, 3, norm)

    def forward(self, target: torch.Tensor, detail: torch.Tensor, boxes: torch.Tensor
                ) -> torch.Tensor:
        """``target (B, Ct, h, w)``, ``detail (B, Cd, b, b)``, ``boxes (B, 4)`` in target px."""
        region = crop_boxes(target, boxes)  # (B, Ct, b, b)
        assert region.shape[-2:] == detail.shape[-2:], (
            f"MRFM: box {tuple(region.shape[-2:])} != detail map {tuple(detail.shape[-2:])}; "
            "eq. 1-2 requires equal sampling resolution")
        fused = self.smooth(region + self.project(self.se(detail)))
        out = target.clone()
        for b, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
            out[b, :, y0:y1, x0:x1] = fused[b]
        return out


class HEBranch(nn.Module):
    """Target branch on ``X_aim``; with ``zoom`` = ``cam`` or ``centre``, the detail branch on the
    40x crop of the key region, fused by MRFM at stride 2 of the target decoder."""

    def __init__(self, cfg: ModelConfig, num_classes: int, tumour: list[int], zoom: str) -> None:
        super().__init__()
        if cfg.cam_stride not in CAM_STRIDES:  # a level before MRFM
            raise ValueError(f"model.cam_stride={cfg.cam_stride}: choose one of {CAM_STRIDES}")
        self.zoom, self.tumour = zoom, tumour
        self.window_frac, self.stride_frac = cfg.window_frac, cfg.stride_frac
        self.cam_level = level_index(cfg.cam_stride)
        make = lambda: VGGUNet(3, num_classes, cfg.width, cfg.decoder_width, cfg.norm)  # noqa: E731
        self.target = make()
        if zoom != "none":
            self.detail = make()
            c_detail = self.detail.decoder.channels[level_index(DETAIL_STRIDE)]
            c_target = self.target.decoder.channels[level_index(TARGET_STRIDE)]
            self.mrfm = MRFM(c_detail, c_target, cfg.se_reduction, cfg.norm)

    def forward(self, x_aim: torch.Tensor, he_40x: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``x_aim (B, 3, H, W)``, ``he_40x (B, 3, 4H, 4W)`` -> logits, decoder levels, CAM, box."""
        stages = self.target.encoder(x_aim)
        decoder, head = self.target.decoder, self.target.head
        if self.zoom == "none":
            levels = decoder(stages)
            return {"logits": head(levels[-1]), "levels": levels,
                    "cam": self.saliency(levels[self.cam_level], stages)}
        fuse_at = level_index(TARGET_STRIDE)
        coarse = decoder.resume(stages[-1], stages, 0, fuse_at + 1)  # strides 8, 4, 2
        cam = self.saliency(coarse[self.cam_level], stages)
        boxes = self.key_region(cam)
        high_logits, high_levels = self.detail(crop_boxes(he_40x, boxes, ZOOM))
        refined = self.mrfm(coarse[-1], high_levels[level_index(DETAIL_STRIDE)],
                            boxes // TARGET_STRIDE)
        levels = [*coarse[:-1], refined, *decoder.resume(refined, stages, fuse_at + 1)]
        return {"logits": head(levels[-1]), "levels": levels, "cam": cam, "boxes": boxes,
                "logits_high": high_logits}

    def saliency(self, features: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor:
        """``(B, H, W)`` Grad-CAM of the tumour probability, read at ``features`` (the decoder
        level ``cam_level``); the rest of the target branch runs frozen (no side effects)."""
        skips = [s.detach() for s in stages]
        decoder, head, batch_stats = self.target.decoder, self.target.head, self.training

        def tail(x: torch.Tensor) -> torch.Tensor:
            x = decoder.frozen_resume(x, skips, self.cam_level + 1, batch_stats)
            bias = None if head.bias is None else head.bias.detach()
            return F.conv2d(x, head.weight.detach(), bias)

        return grad_cam(features, tail, self.tumour, stages[0].shape[-2:])

    def key_region(self, cam: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` box ``(y0, x0, y1, x1)`` in 10x pixels, not differentiated through: the
        window of highest mean saliency, or the centred window (``mrcfm``, or a flat map)."""
        h, w = cam.shape[-2:]
        window = window_size(h, w, self.window_frac)
        centre = centre_box(cam.shape[0], (h, w), window, cam.device)
        if self.zoom == "centre":
            return centre
        found = window_search(cam.detach(), window, search_stride(h, w, self.stride_frac))
        flat = cam.flatten(1).amax(dim=1) <= 0  # nothing salient: zoom on the centre
        return torch.where(flat[:, None], centre, found)
