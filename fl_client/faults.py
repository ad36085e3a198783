"""Deliberate misbehaviour for experiments and tests (`sim/run.py --fault KIND:COUNT`).

Only the simulation sets it; a real site never does. Each kind mimics a failure the server
must survive: ``nan`` (diverged training), ``shape`` (a site running another model version),
``scale`` (an update 10^6 times too large: a bug or an attack), ``dropout`` (the site dies),
``inflate`` (a poisoning attack built to pass the norm rule, see :func:`inflate`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

FAULTS = ("nan", "shape", "scale", "dropout", "inflate")
INFLATED_EXAMPLES = 10**9  # the num-examples an inflating site claims, to dominate FedAvg
LIMIT_SHARE = 0.9  # inflate: the update's norm as a share of the norm rule's (estimated) limit


class SimulatedFailure(RuntimeError):
    """The ``dropout`` fault: the site fails mid-round."""


def inject_fault(kind: str | None, state: dict[str, torch.Tensor],
                 received: dict[str, torch.Tensor] | None = None,
                 max_update_ratio: float = 0.0) -> dict[str, torch.Tensor]:
    """The state dict as the faulty site would send it (unchanged when ``kind`` is None).

    ``inflate`` needs ``received`` (the global model of this round) and the centre's
    ``max_update_ratio`` (the simulation passes its ``--max-update-ratio``).
    """
    if kind is None:
        return state
    if kind == "dropout":
        raise SimulatedFailure("simulated site failure (fault injection: dropout)")
    if kind == "inflate":
        if received is None or max_update_ratio <= 0:
            raise ValueError("the inflate fault needs the received model and the centre's "
                             "max update ratio")
        return inflate(state, received, max_update_ratio)
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


def inflate(state: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
            max_update_ratio: float) -> dict[str, torch.Tensor]:
    """``w_g - k (w_site - w_g)``: the site's honest update, reversed and stretched by ``k``.

    The norm rule rejects an update longer than ``max_update_ratio`` times the median of the
    other sites' update norms, which a site never sees. The attacker estimates that median by
    the norm of its own honest update (every site runs the same local schedule from the same
    global model, so their update norms are alike), hence ``k = LIMIT_SHARE * max_update_ratio``
    puts its update at 0.9 times the limit it expects. Claiming ``INFLATED_EXAMPLES`` examples
    on top makes a FedAvg that trusts the claim adopt this update almost alone.
    """
    k = LIMIT_SHARE * max_update_ratio
    out = OrderedDict()
    for name, w in state.items():
        start = received[name].to(w.device)
        out[name] = start - k * (w - start) if w.is_floating_point() else w
    return out
