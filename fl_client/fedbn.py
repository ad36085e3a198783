"""FedBN: normalisation layers stay at the site (a known remedy for stain differences).

The site saves the parameters and statistics of every BatchNorm/GroupNorm layer after local
training, on its own disk, and puts them back over the global model it receives each round,
for training and for evaluation alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

NORMS = (nn.BatchNorm2d, nn.GroupNorm)


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = [name for name, module in model.named_modules() if isinstance(module, NORMS)]
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[0] in names}


def save_local_norms(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(norm_state(model), tmp)
    tmp.replace(path)


def restore_local_norms(model: nn.Module, path: Path) -> bool:
    """Overwrite the model's normalisation layers with the site's own; False on round 1."""
    if not path.exists():
        return False
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
    return True
