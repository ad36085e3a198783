"""Deliberate misbehaviour for experiments and tests (`sim/run.py --fault KIND:COUNT`).

Only the simulation sets it; a real site never does. Each kind mimics a failure the server
must survive: ``nan`` (diverged training), ``shape`` (a site running another model version),
``scale`` (an update 10^6 times too large: a bug or an attack), ``dropout`` (the site dies),
``inflate`` (a poisoning attack built to pass the norm rule, see :func:`inflate`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from egcmf_model.packing import FLOAT, kind

FAULTS = ("nan", "shape", "scale", "dropout", "inflate")
INFLATED_EXAMPLES = 10**9  # the num-examples an inflating site claims, to dominate FedAvg
LIMIT_SHARE = 0.9  # inflate: the update's norm as a share of the norm rule's (estimated) limit


class SimulatedFailure(RuntimeError):
    """The ``dropout`` fault: the site fails mid-round."""


def inject_fault(fault: str | None, weights: dict[str, torch.Tensor],
                 received: dict[str, torch.Tensor] | None = None,
                 max_update_ratio: float = 0.0) -> dict[str, torch.Tensor]:
    """The packed weights as the faulty site would send them (unchanged when ``fault`` is
    None, and for ``shape``, which :func:`misshape` applies to the encoded reply).

    ``inflate`` needs ``received`` (the global model of this round, packed) and the centre's
    ``max_update_ratio`` (the simulation passes its ``--max-update-ratio``).
    """
    if fault in (None, "shape"):
        return weights
    if fault == "dropout":
        raise SimulatedFailure("simulated site failure (fault injection: dropout)")
    if fault == "inflate":
        if received is None or max_update_ratio <= 0:
            raise ValueError("the inflate fault needs the received model and the centre's "
                             "max update ratio")
        return inflate(weights, received, max_update_ratio)
    out = {k: v.clone() for k, v in weights.items()}
    floats = [k for k in out if kind(k) == FLOAT]
    if fault == "nan":
        out[floats[0]][0] = float("nan")
    elif fault == "scale":
        for k in floats:
            out[k] = out[k] * 1e6
    else:
        raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
    return out


def misshape(record: ArrayRecord) -> ArrayRecord:
    """The ``shape`` fault: the first float buffer one element too long, as a site running
    another version of the network would send it."""
    first = next(k for k in record if kind(k) == FLOAT)
    values = record[first].numpy()
    return ArrayRecord({**record, first: Array(np.concatenate([values, values[:1]]))})


def inflate(weights: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
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
    return {name: received[name] - k * (w - received[name]) if kind(name) == FLOAT else w
            for name, w in weights.items()}
