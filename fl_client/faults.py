"""Deliberate misbehaviour for experiments and tests (`sim/run.py --fault KIND:COUNT`).

Only the simulation sets it; a real site never does. Each kind mimics a failure the server
must survive: ``nan`` (diverged training), ``shape`` (a site running another model version),
``scale`` (an update 10^6 times too large: a bug or an attack), ``dropout`` (the site dies),
``inflate`` (a poisoning attack built to pass the norm rule, see :func:`inflate`, claiming
10^9 examples), ``reverse`` (the same poisoned update with its BatchNorm variances kept
valid, claiming the site's true number of examples: a reply that passes every check made on
it alone).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from egcmf_model.packing import FLOAT
from egcmf_model.packing import kind as buffer_kind

FAULTS = ("nan", "shape", "scale", "dropout", "inflate", "reverse")
POISONED = ("inflate", "reverse")  # faults that send the update of :func:`inflate`
INFLATED_EXAMPLES = 10**9  # the num-examples an inflating site claims, to dominate FedAvg
LIMIT_SHARE = 0.9  # inflate: the update's norm as a share of the norm rule's (estimated) limit


class SimulatedFailure(RuntimeError):
    """The ``dropout`` fault: the site fails mid-round."""


def inject_fault(kind: str | None, state: dict[str, torch.Tensor],
                 received: dict[str, torch.Tensor] | None = None,
                 max_update_ratio: float = 0.0) -> dict[str, torch.Tensor]:
    """The state dict as the faulty site would send it (unchanged when ``kind`` is None, and
    for ``shape``, which :func:`misshape` applies to the packed reply).

    ``inflate`` and ``reverse`` need ``received`` (the global model of this round) and the
    centre's ``max_update_ratio`` (the simulation passes its ``--max-update-ratio``).
    """
    if kind in (None, "shape"):
        return state
    if kind == "dropout":
        raise SimulatedFailure("simulated site failure (fault injection: dropout)")
    if kind in POISONED:
        if received is None or max_update_ratio <= 0:
            raise ValueError(f"the {kind} fault needs the received model and the centre's "
                             "max update ratio")
        return inflate(state, received, max_update_ratio, valid=kind == "reverse")
    out = OrderedDict((k, v.clone()) for k, v in state.items())
    first = next(k for k, v in out.items() if v.is_floating_point())
    if kind == "nan":
        out[first].view(-1)[0] = float("nan")
    elif kind == "scale":
        for k, v in out.items():
            if v.is_floating_point():
                out[k] = v * 1e6
    else:
        raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(FAULTS)}")
    return out


def misshape(record: ArrayRecord) -> ArrayRecord:
    """The ``shape`` fault: the first float buffer one element too long, as a site running
    another version of the network would send it."""
    first = next(k for k in record if buffer_kind(k) == FLOAT)
    values = record[first].numpy()
    return ArrayRecord({**record, first: Array(np.concatenate([values, values[:1]]))})


def inflate(state: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
            max_update_ratio: float, valid: bool = False) -> dict[str, torch.Tensor]:
    """``w_g - k (w_site - w_g)``: the site's honest update, reversed and stretched by ``k``.

    The norm rule rejects an update longer than ``max_update_ratio`` times the median of the
    other sites' update norms, which a site never sees. The attacker estimates that median by
    the norm of its own honest update (every site runs the same local schedule from the same
    global model, so their update norms are alike), hence ``k = LIMIT_SHARE * max_update_ratio``
    puts its update at 0.9 times the limit it expects. Claiming ``INFLATED_EXAMPLES`` examples
    on top makes a FedAvg that trusts the claim adopt this update almost alone. With ``valid``,
    the BatchNorm running variances that this makes negative are raised to 0, which no check
    of a single update can tell from a real one.
    """
    k = LIMIT_SHARE * max_update_ratio
    out = OrderedDict()
    for name, w in state.items():
        start = received[name].to(w.device)
        out[name] = start - k * (w - start) if w.is_floating_point() else w
        if valid and name.endswith("running_var"):
            out[name] = out[name].clamp(min=0.0)
    return out
