"""Flower's own strategies, chosen by name and configured from the run settings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fl_common.replies import SITE_WEIGHT  # 1 for every site: client-level DP counts sites

from .settings import DEFAULTS, STRATEGIES


@dataclass(frozen=True)
class StrategyOptions:
    """What a strategy needs of the settings; defaults from :mod:`fl_server.settings`."""

    name: str = DEFAULTS.strategy
    min_sites: int = DEFAULTS.min_sites
    proximal_mu: float = DEFAULTS.proximal_mu
    trim_fraction: float = DEFAULTS.trim_fraction
    krum_f: int = DEFAULTS.krum_f
    server_lr: float = DEFAULTS.server_lr
    sites: int = DEFAULTS.min_sites  # sites in every round (server-side DP samples all)
    server_dp_noise: float = DEFAULTS.server_dp_noise
    server_dp_clip: float = DEFAULTS.server_dp_clip
    server_dp_epsilon: float = DEFAULTS.server_dp_epsilon
    server_dp_delta: float = DEFAULTS.server_dp_delta


def protection_problem(name: str, sites: int, trim_fraction: float, krum_f: int) -> str | None:
    """Why strategy ``name`` cannot give the protection it is configured for with ``sites``
    updates; None when it can."""
    if name == "trimmed-mean" and not 0 < trim_fraction < 0.5:
        return (f"trimmed-mean cuts --trim-fraction of the updates at each end: it must be "
                f"above 0 and below 0.5, not {trim_fraction:g}")
    if name == "trimmed-mean" and int(trim_fraction * sites) < 1:
        need = f"at least {math.ceil(1 / trim_fraction)} sites"
        return (f"trimmed-mean with --trim-fraction {trim_fraction:g} cuts int("
                f"{trim_fraction:g} x {sites}) = 0 updates at each end with {sites} sites: it "
                f"is a plain mean and bounds nothing; it needs {need}")
    if name == "krum" and sites < 2 * krum_f + 3:
        return (f"krum with --krum-f {krum_f} needs at least {2 * krum_f + 3} sites "
                f"(n >= 2f + 3) to tolerate {krum_f} bad one(s), not {sites}")
    if name == "fedmedian" and sites < 3:
        return (f"fedmedian with {sites} sites is a plain mean and bounds nothing; the "
                "coordinate-wise median outvotes one bad update only from 3 sites")
    return None


def make_strategy(opts: StrategyOptions) -> Strategy:
    """A Message-API strategy that trains and evaluates on every connected site (at least
    ``min_sites``), weighting by ``num-examples`` where it averages."""
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0,
              "min_train_nodes": opts.min_sites, "min_evaluate_nodes": opts.min_sites,
              "min_available_nodes": opts.min_sites}
    builders = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=opts.proximal_mu),
        "fedadam": lambda: FedAdam(**common, eta=opts.server_lr),
        "fedmedian": lambda: FedMedian(**common),
        "trimmed-mean": lambda: FedTrimmedAvg(**common, beta=opts.trim_fraction),
        "krum": lambda: Krum(**common, num_malicious_nodes=opts.krum_f),
    }
    if opts.name not in builders:
        raise ValueError(f"unknown strategy {opts.name!r}; choose one of {', '.join(STRATEGIES)}")
    if opts.server_dp_noise <= 0:
        return builders[opts.name]()
    if opts.name != "fedavg":
        raise ValueError("server-side DP wraps fedavg only")
    return _server_side_dp(opts, common)


def _server_side_dp(opts: StrategyOptions, common: dict) -> Strategy:
    """Flower's DifferentialPrivacyServerSideFixedClipping over an unweighted FedAvg, with its
    RDP accountant: client-level DP against what the released global model reveals."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    accountant = RdpAccountant(PrivacyConfig(
        target_delta=opts.server_dp_delta, population_size=opts.sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=opts.server_dp_epsilon or None))
    inner = FedAvg(**{**common, "min_available_nodes": opts.sites}, weighted_by_key=SITE_WEIGHT)
    return DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=opts.server_dp_noise, clipping_norm=opts.server_dp_clip,
        num_sampled_clients=opts.sites, accountant=accountant)


STATEFUL = ("m_t", "v_t")  # FedOpt family (FedAdam): first and second moment estimates
ACCOUNTANT = "server_dp_accountant"  # server-side DP: the RDP accountant's history, as JSON


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a strategy learns across rounds, for the round checkpoint (empty for most): tensors
    and plain text, so that checkpoints load with ``torch.load(weights_only=True)``."""
    state: dict[str, Any] = {
        name: {k: torch.from_numpy(np.array(v)) for k, v in getattr(strategy, name).items()}
        for name in STATEFUL if getattr(strategy, name, None)}
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        state[ACCOUNTANT] = json.dumps(accountant.state_dict())
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """The state of :func:`strategy_state` back into a strategy built with the same settings.
    A server-side DP run resumed from a checkpoint without its accountant is refused: its
    epsilon would restart at 0."""
    for name, value in state.items():
        if name in STATEFUL and hasattr(strategy, name):
            setattr(strategy, name, {k: np.asarray(v) for k, v in value.items()})
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        if ACCOUNTANT not in state:
            raise ValueError("the checkpoint holds no server-side DP accountant: resuming "
                             "would restart epsilon at 0; start a new run folder instead")
        accountant.load_state_dict(json.loads(state[ACCOUNTANT]))
