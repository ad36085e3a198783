"""VGG16-BN encoder and UNet decoder: the encoder-decoder every branch of EGCMF is built on."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from .blocks import ConvNormAct, make_norm, upsample_to

log = logging.getLogger(__name__)

# torchvision's VGG16 ("D") layout; "M" = 2x2 max-pooling. The last pooling is not used.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LEVELS = 4  # decoder levels: strides 8, 4, 2, 1 (coarse to fine)


def scaled(channels: int, width: float) -> int:
    return max(8, round(channels * width))


class VGGEncoder(nn.Module):
    """VGG16-BN convolutions, laid out as ``torchvision.models.vgg16_bn().features``.

    The identical layer indices let a torchvision VGG16-BN state dict load by path
    (:meth:`load_vgg_state`). Returns the 5 stage outputs at strides 1, 2, 4, 8, 16.
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            cout = scaled(item, width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), make_norm(norm, cout),
                       nn.ReLU(inplace=False)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.channels = [scaled(c, width) for c in (64, 128, 256, 512, 512)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C_in, H, W)`` -> 5 maps, stride 1 to 16, channels ``self.channels``."""
        stages = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                stages.append(x)
            x = layer(x)
        return [*stages, x]

    def load_vgg_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load a torchvision VGG16-BN state dict (``features.*`` keys) read from ``source``;
        adapts the input convolution to this encoder's channels."""
        state = {k.removeprefix("features."): v for k, v in state.items()
                 if k.startswith("features.")}
        channels = self.features[0].weight.shape[1]
        if "0.weight" in state and state["0.weight"].shape[1] != channels:
            # Spread the RGB filters' sum over our channels: a grey input of any channel count
            # then gives the response the RGB filters give to grey.
            total = state["0.weight"].sum(dim=1, keepdim=True)
            state["0.weight"] = (total / channels).repeat(1, channels, 1, 1)
        own = self.features.state_dict()
        for key, value in state.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(f"model.weights {source}: features.{key} is "
                                 f"{tuple(value.shape)} there and {tuple(own[key].shape)} in "
                                 "this network: VGG16-BN's full widths need model.width=1.0")
        missing, unexpected = self.features.load_state_dict(state, strict=False)
        if not set(state) - set(unexpected):
            raise ValueError(f"model.weights {source}: no VGG16-BN weight fits this encoder")
        if unexpected or missing:
            log.warning("VGG weights %s: %d missing, %d unexpected keys (BatchNorm statistics "
                        "have no place in a GroupNorm network, whose encoders then differ "
                        "from the pretrained ones)", source, len(missing), len(unexpected))


class DecoderBlock(nn.Module):
    """Upsample, concatenate the encoder skip, two 3x3 ConvNormAct."""

    def __init__(self, cin: int, cskip: int, cout: int, norm: str) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin + cskip, cout, 3, norm)
        self.conv2 = ConvNormAct(cout, cout, 3, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``(B, cin, h, w)``, ``(B, cskip, 2h, 2w)`` -> ``(B, cout, 2h, 2w)``."""
        return self.conv2(self.conv1(torch.cat([upsample_to(x, skip), skip], dim=1)))

    def frozen(self, x: torch.Tensor, skip: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        """:meth:`forward` on detached weights, without calling a module (see ConvNormAct)."""
        x = torch.cat([upsample_to(x, skip), skip], dim=1)
        return self.conv2.frozen(self.conv1.frozen(x, batch_stats), batch_stats)


class UNetDecoder(nn.Module):
    """Four decoder blocks from stride 16 to stride 1; returns every level (coarse to fine)."""

    def __init__(self, enc_channels: list[int], decoder_width: float, norm: str) -> None:
        super().__init__()
        cin, blocks, self.channels = enc_channels[-1], [], []
        for skip in reversed(enc_channels[:LEVELS]):
            cout = max(8, round(skip * decoder_width))
            blocks.append(DecoderBlock(cin, skip, cout, norm))
            self.channels.append(cout)
            cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """5 encoder stages -> 4 decoder maps at strides 8, 4, 2, 1."""
        return self.resume(stages[-1], stages, start=0)

    def resume(self, x: torch.Tensor, stages: list[torch.Tensor], start: int,
               stop: int = LEVELS) -> list[torch.Tensor]:
        """Run levels ``start..stop-1`` from ``x`` (the output of level ``start - 1``)."""
        outputs = []
        for level in range(start, stop):
            x = self.blocks[level](x, stages[LEVELS - 1 - level])
            outputs.append(x)
        return outputs

    def frozen_resume(self, x: torch.Tensor, stages: list[torch.Tensor], start: int,
                      batch_stats: bool) -> torch.Tensor:
        """Levels ``start``.. to the finest, on detached weights (see ConvNormAct.frozen)."""
        for level in range(start, LEVELS):
            x = self.blocks[level].frozen(x, stages[LEVELS - 1 - level], batch_stats)
        return x


class VGGUNet(nn.Module):
    """VGG16-BN UNet: ``features = encoder(x)``, ``levels = decoder(features)``, ``head``."""

    def __init__(self, in_channels: int, out_channels: int, width: float, decoder_width: float,
                 norm: str) -> None:
        super().__init__()
        self.encoder = VGGEncoder(in_channels, width, norm)
        self.decoder = UNetDecoder(self.encoder.channels, decoder_width, norm)
        self.head = nn.Conv2d(self.decoder.channels[-1], out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, C_in, H, W)`` -> logits ``(B, out, H, W)`` and the 4 decoder levels."""
        levels = self.decoder(self.encoder(x))
        return self.head(levels[-1]), levels
