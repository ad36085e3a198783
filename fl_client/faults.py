"""Deliberate misbehaviour for experiments and tests (`sim/run.py --fault KIND:COUNT`).

Only the simulation sets it; a real site never does. Each kind mimics a failure the server
must survive: ``nan`` (diverged training), ``shape`` (a site running another model version),
``scale`` (an update 10^6 times too large: a bug or an attack), ``dropout`` (the site dies).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

FAULTS = ("nan", "shape", "scale", "dropout")


def inject_fault(kind: str | None, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as the faulty site would send it (unchanged when ``kind`` is None)."""
    if kind is None:
        return state
    if kind == "dropout":
        raise RuntimeError("simulated site failure (fault injection: dropout)")
    out = OrderedDict((k, v.clone()) for k, v in state.items())
    first = next(k for k, v in out.items() if v.is_floating_point())
    if kind == "nan":
        out[first].view(-1)[0] = float("nan")
    elif kind == "shape":
        out[first] = torch.cat([out[first], out[first][:1]])  # one row too many
    elif kind == "scale":
        for k, v in out.items():
            if v.is_floating_point():
                out[k] = v * 1e6
    else:
        raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(FAULTS)}")
    return out
