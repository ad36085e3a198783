"""Small building blocks shared by every branch. No in-place activations (Opacus-safe)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import determinism


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm (DP-SGD compatible) with up to 32 groups that divide ``channels``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> norm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, norm: str = "batch") -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            make_norm(norm, cout),
            nn.ReLU(inplace=False),
        )

    def frozen(self, x: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        """The same function on detached weights, calling no module: no hook fires (Opacus), no
        running statistic moves. ``batch_stats``: normalise with the batch's statistics (as in
        training) instead of the running ones."""
        conv, norm, _ = self
        bias = None if conv.bias is None else conv.bias.detach()
        x = F.conv2d(x, conv.weight.detach(), bias, conv.stride, conv.padding)
        return F.relu(frozen_norm(norm, x, batch_stats))


def frozen_norm(norm: nn.Module, x: torch.Tensor, batch_stats: bool) -> torch.Tensor:
    """BatchNorm or GroupNorm ``norm`` applied functionally on detached parameters."""
    weight = None if norm.weight is None else norm.weight.detach()
    bias = None if norm.bias is None else norm.bias.detach()
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
    if isinstance(norm, nn.BatchNorm2d):
        if batch_stats or norm.running_mean is None:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=norm.eps)
        return F.batch_norm(x, norm.running_mean, norm.running_var, weight, bias, training=False,
                            eps=norm.eps)
    raise TypeError(f"no frozen form for {type(norm).__name__}")


class SqueezeExcitation(nn.Module):
    """SE block (Hu et al.): channel gates from global average pooling."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> same shape, channels reweighted."""
        gate = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared MLP on average- and max-pooled descriptors."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=False),
                                 nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> same shape, channels reweighted."""
        # Both descriptors side by side, (B, C, 1, 2): one pass of the MLP instead of two. The
        # two halves are added, not summed: bf16 autocast runs sum() in float32, which would
        # turn every gated map float32
        pooled = torch.cat([x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)],
                           dim=3)
        both = self.mlp(pooled)
        return x * torch.sigmoid(both[..., :1] + both[..., 1:])


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7x7 conv on channel-average and channel-max maps."""

    def __init__(self, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> same shape, positions reweighted."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class AttentionGate(nn.Module):
    """Spatial gate computed from the features themselves: highlights e.g. lesion rims."""

    def __init__(self, channels: int, reduction: int = 4, norm: str = "batch") -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.gate = nn.Sequential(ConvNormAct(channels, hidden, 1, norm), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> same shape, multiplied by a ``(B, 1, H, W)`` gate in (0, 1)."""
        return x * torch.sigmoid(self.gate(x))


class DepthwiseSeparableConv(nn.Sequential):
    """3x3 depthwise then 1x1 pointwise conv, norm, ReLU."""

    def __init__(self, cin: int, cout: int, norm: str = "batch") -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            make_norm(norm, cout),
            nn.ReLU(inplace=False),
        )


def upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to the spatial size of ``like`` (deterministic on a GPU when
    ``train.deterministic`` asks for it)."""
    if determinism.wanted(x):
        return determinism.bilinear(x, tuple(like.shape[-2:]))
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
