"""CK5/6 edge branch: semantic and edge encoder-decoders, fused by EDFM at 4 encoder levels."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import (
    AttentionGate,
    ChannelAttention,
    ConvNormAct,
    DepthwiseSeparableConv,
    upsample_to,
)
from .config import ModelConfig
from .vgg_unet import LEVELS, VGGEncoder, VGGUNet


class EDFM(nn.Module):
    """Edge detection fusion: channel attention on both, concatenate, attention gate,
    depthwise-separable conv -> ``F_fusion^l``."""

    def __init__(self, channels: int, reduction: int, norm: str) -> None:
        super().__init__()
        self.ca_sem = ChannelAttention(channels, reduction)
        self.ca_edge = ChannelAttention(channels, reduction)
        self.gate = AttentionGate(2 * channels, norm=norm)
        self.fuse = DepthwiseSeparableConv(2 * channels, channels, norm)

    def forward(self, sem: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        """Two ``(B, C, h, w)`` encoder maps -> ``(B, C, h, w)``."""
        return self.fuse(self.gate(torch.cat([self.ca_sem(sem), self.ca_edge(edge)], dim=1)))


class SemanticDecoder(nn.Module):
    """Eq. 3: ``F_dec^l = Up(F_dec^{l+1}) + F_fusion^l`` (1x1 conv where channels differ), each
    sum refined by a 3x3 ConvNormAct."""

    def __init__(self, enc_channels: list[int], norm: str) -> None:
        super().__init__()
        widths = list(reversed(enc_channels[:LEVELS]))  # stride 8 -> 1
        previous = [enc_channels[LEVELS], *widths[:-1]]
        self.align = nn.ModuleList(
            nn.Identity() if p == c else nn.Conv2d(p, c, 1) for p, c in zip(previous, widths,
                                                                             strict=True))
        self.refine = nn.ModuleList(ConvNormAct(c, c, 3, norm) for c in widths)

    def forward(self, deepest: torch.Tensor, fusions: list[torch.Tensor]) -> torch.Tensor:
        """``deepest (B, C5, H/16, W/16)``, fusions at strides 8..1 -> ``(B, C1, H, W)``."""
        x = deepest
        for align, refine, fused in zip(self.align, self.refine, fusions, strict=True):
            x = refine(upsample_to(align(x), fused) + fused)
        return x


class CK56Branch(nn.Module):
    """``X_sem`` (CK5/6 RGB) and ``X_edge`` (grayscale + DAB) -> ``Y_sem``, ``Y_edge`` and the
    edge decoder's 4 levels, which guide the H&E segmentation in the fusion branch."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.sem_encoder = VGGEncoder(3, cfg.width, cfg.norm)
        self.edge_net = VGGUNet(2, 1, cfg.width, cfg.decoder_width, cfg.norm)
        channels = self.sem_encoder.channels
        self.edfm = nn.ModuleList(EDFM(c, cfg.se_reduction, cfg.norm) for c in channels[:LEVELS])
        self.sem_decoder = SemanticDecoder(channels, cfg.norm)
        self.sem_head = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x_sem: torch.Tensor, x_edge: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)``, ``(B, 2, H, W)`` -> ``sem (B, K, H, W)``, ``edge (B, 1, H, W)``,
        ``edge_levels``: 4 maps at strides 8, 4, 2, 1."""
        sem = self.sem_encoder(x_sem)
        edge = self.edge_net.encoder(x_edge)
        fusions = [m(s, e) for m, s, e in zip(self.edfm, sem[:LEVELS], edge[:LEVELS], strict=True)]
        y_sem = self.sem_head(self.sem_decoder(sem[LEVELS], fusions[::-1]))
        edge_levels = self.edge_net.decoder(edge)
        return {"sem": y_sem, "edge": self.edge_net.head(edge_levels[-1]),
                "edge_levels": edge_levels}
