"""Multi-scale feature fusion (MSFFM) with axial cross-attention: H&E queries, CK5/6 edge keys."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ChannelAttention, ConvNormAct, SpatialAttention, upsample_to

MIN_HEAD_DIM = 16  # channels per attention head, at least


class AxialCrossAttention(nn.Module):
    """Eq. 4-6: multi-head attention along rows (horizontal) and along columns (vertical), with
    queries from the H&E features and keys/values from the CK5/6 edge features; the two summed.

    The paper's eq. 4 writes sigma(Q K^T) / sqrt(d_k); we use the usual
    softmax(Q K^T / sqrt(d_k)). Heads keep at least ``MIN_HEAD_DIM`` channels each: at full
    resolution, 8 heads of 4 channels made the attention maps 8x larger for no benefit.
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = math.gcd(max(1, min(heads, channels // MIN_HEAD_DIM)), channels)
        self.qkv_hor = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.qkv_ver = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(3))

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``query``, ``context`` ``(B, C, H, W)`` -> ``F_hor + F_ver`` ``(B, C, H, W)``."""
        hor = self._rows(*(proj(x) for proj, x in zip(self.qkv_hor, (query, context, context),
                                                      strict=True)))
        q, k, v = (proj(x).transpose(2, 3) for proj, x in zip(self.qkv_ver,
                                                             (query, context, context),
                                                             strict=True))
        ver = self._rows(q, k, v).transpose(2, 3)  # columns = rows of the transposed maps
        return hor + ver

    def _rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention within each row: every position attends over the W positions of its row.

        Rows are folded into the batch so that SDPA sees 4-D ``(batch, heads, seq, dim)``
        tensors: only then does it take its fused kernels (flash or memory-efficient) instead
        of the math path that materialises every attention matrix.
        """
        b, c, h, w = q.shape
        heads, d = self.heads, c // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            t = t.view(b, heads, d, h, w).permute(0, 3, 1, 4, 2)  # (B, H, heads, W, d)
            return t.reshape(b * h, heads, w, d)  # (B*H, heads, W, d)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B*H, heads, W, d)
        out = out.view(b, h, heads, w, d).permute(0, 2, 4, 1, 3)  # (B, heads, d, H, W)
        return out.reshape(b, c, h, w)


class FusionLevel(nn.Module):
    """One MSFFM scale: spatial attention on both inputs, axial cross-attention, concatenation
    with the upsampled coarser fusion, channel attention, 1x1 reduction -> ``F_fusion^l``."""

    def __init__(self, channels: int, c_prev: int | None, heads: int, reduction: int,
                 norm: str) -> None:
        super().__init__()
        self.sa_he, self.sa_edge = SpatialAttention(), SpatialAttention()
        self.axial = AxialCrossAttention(channels, heads)
        self.prev = nn.Conv2d(c_prev, channels, 1) if c_prev else None
        cin = channels * (4 if c_prev else 3)
        self.channel_attention = ChannelAttention(cin, reduction)
        self.out = ConvNormAct(cin, channels, 1, norm)

    def forward(self, he: torch.Tensor, edge: torch.Tensor, prev: torch.Tensor | None
                ) -> torch.Tensor:
        """``he``, ``edge`` ``(B, C, h, w)``; ``prev`` ``(B, C', h/2, w/2)`` or None.

        Returns ``F_fusion^l`` ``(B, C, h, w)``.
        """
        he, edge = self.sa_he(he), self.sa_edge(edge)
        parts = [he, edge, self.axial(he, edge)]
        if self.prev is not None and prev is not None:
            parts.append(upsample_to(self.prev(prev), he))
        return self.out(self.channel_attention(torch.cat(parts, dim=1)))


class MSFFM(nn.Module):
    """Coarse-to-fine fusion over the 4 decoder scales; a 1x1 head gives the final logits ``P``."""

    def __init__(self, channels: list[int], num_classes: int, heads: int, reduction: int,
                 norm: str) -> None:
        super().__init__()
        previous = [None, *channels[:-1]]
        self.levels = nn.ModuleList(FusionLevel(c, p, heads, reduction, norm)
                                    for c, p in zip(channels, previous, strict=True))
        self.head = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, he_levels: list[torch.Tensor], edge_levels: list[torch.Tensor]
                ) -> torch.Tensor:
        """4 H&E and 4 edge decoder maps (strides 8..1) -> logits ``(B, K, H, W)``."""
        fused = None
        for level, he, edge in zip(self.levels, he_levels, edge_levels, strict=True):
            fused = level(he, edge, fused)
        return self.head(fused)
