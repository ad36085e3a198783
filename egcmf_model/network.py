"""EGCMF: the H&E branch, the CK5/6 edge branch and the fusion branch, composed; and variants.

Variants (Table V): ``unet`` (target branch only), ``mrcfm`` (detail branch on a centred box),
``mrfm`` (detail branch on the Grad-CAM box: the paper's H&E branch, and the H&E-only mode for
data without CK5/6 such as BCSS), ``mrfm+edm`` (CK5/6 edge branch fused by concatenation) and
``full`` (MSFFM).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvNormAct
from .ck56_branch import CK56Branch
from .config import VARIANTS, ModelConfig
from .fusion import MSFFM
from .he_branch import ZOOM, HEBranch

ZOOM_OF = {"unet": "none", "mrcfm": "centre", "mrfm": "cam", "mrfm+edm": "cam", "full": "cam"}
EDGE_VARIANTS = ("mrfm+edm", "full")
DIVISOR = 32  # input side must be a multiple: 4 poolings, and an even box at stride 2


def needs_ck56(variant: str) -> bool:
    return variant in EDGE_VARIANTS


class EGCMF(nn.Module):
    """Edge-guided cross-modal fusion network.

    Args:
        cfg: model configuration (variant, widths, norm, input size).
        num_classes: K, number of segmentation classes.
        tumour: class ids whose logits drive Grad-CAM (e.g. ``in_situ``, ``invasive``).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, tumour: list[int]) -> None:
        super().__init__()
        if cfg.variant not in ZOOM_OF:
            raise ValueError(f"unknown variant {cfg.variant!r}; choose one of {VARIANTS}")
        if cfg.in_size % DIVISOR:
            raise ValueError(f"model.in_size={cfg.in_size} must be a multiple of {DIVISOR}")
        self.cfg, self.num_classes = cfg, num_classes
        self.he_branch = HEBranch(cfg, num_classes, tumour, ZOOM_OF[cfg.variant])
        if needs_ck56(cfg.variant):
            self.ck56_branch = CK56Branch(cfg, num_classes)
            he_ch = self.he_branch.target.decoder.channels
            edge_ch = self.ck56_branch.edge_net.decoder.channels
            if cfg.variant == "full":
                self.fusion = MSFFM(he_ch, num_classes, cfg.heads, cfg.se_reduction, cfg.norm)
            else:
                self.concat_head = nn.Sequential(
                    ConvNormAct(he_ch[-1] + edge_ch[-1], he_ch[-1], 3, cfg.norm),
                    nn.Conv2d(he_ch[-1], num_classes, 1))

    def forward(
        self,
        he: torch.Tensor,
        he_40x: torch.Tensor | None = None,
        ck56: torch.Tensor | None = None,
        edge: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Segment one batch.

        Args:
            he: ``X_aim`` ``(B, 3, H, W)``, H&E at 10x.
            he_40x: ``(B, 3, 4H, 4W)`` H&E at 40x (variants with a detail branch).
            ck56: ``X_sem`` ``(B, 3, H, W)``; edge: ``X_edge`` ``(B, 2, H, W)`` (edge variants).

        Returns:
            ``logits`` P ``(B, K, H, W)``, ``cam`` ``(B, H, W)``; with a detail branch also
            ``boxes`` ``(B, 4)`` (10x px) and ``logits_high`` ``(B, K, H, W)``; with the CK5/6
            branch ``sem`` ``(B, K, H, W)``, ``edge`` ``(B, 1, H, W)`` and ``logits_aim``
            ``(B, K, H, W)``, the target branch's prediction before fusion.
        """
        self._check(he, he_40x, ck56, edge)
        out = self.he_branch(he, he_40x)
        levels = out.pop("levels")
        if not needs_ck56(self.cfg.variant):
            return out
        ck = self.ck56_branch(ck56, edge)
        edge_levels = ck.pop("edge_levels")
        out["logits_aim"] = out["logits"]  # the target branch's own P_aim, which Grad-CAM reads
        if self.cfg.variant == "full":
            out["logits"] = self.fusion(levels, edge_levels)
        else:
            out["logits"] = self.concat_head(torch.cat([levels[-1], edge_levels[-1]], dim=1))
        return {**out, **ck}

    def _check(self, he, he_40x, ck56, edge) -> None:
        h, w = he.shape[-2:]
        if h % DIVISOR or w % DIVISOR:
            raise ValueError(f"H&E input {h}x{w}: height and width must be multiples of "
                             f"{DIVISOR}; pad to {-(-h // DIVISOR) * DIVISOR}x"
                             f"{-(-w // DIVISOR) * DIVISOR}")
        if ZOOM_OF[self.cfg.variant] != "none" and (
                he_40x is None or tuple(he_40x.shape[-2:]) != (ZOOM * h, ZOOM * w)):
            raise ValueError(f"variant {self.cfg.variant} needs he_40x of {ZOOM * h}x{ZOOM * w}")
        if needs_ck56(self.cfg.variant) and (ck56 is None or edge is None):
            raise ValueError(f"variant {self.cfg.variant} needs CK5/6 inputs (ck56 and edge); "
                             "for H&E-only data use --variant mrfm")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
