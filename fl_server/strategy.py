"""Flower's own strategies, chosen by name and configured from the run settings."""

from __future__ import annotations

from dataclasses import dataclass

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


SITE_WEIGHT = "site-weight"  # 1 for every site: client-level DP averages sites uniformly


STATEFUL = ("m_t", "v_t")  # FedOpt family (FedAdam): first and second moment estimates


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """What a strategy learns across rounds, for the round checkpoint (empty for most); as
    tensors, so that checkpoints load with ``torch.load(weights_only=True)``."""
    return {name: {k: torch.from_numpy(np.array(v)) for k, v in getattr(strategy, name).items()}
            for name in STATEFUL if getattr(strategy, name, None)}


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, torch.Tensor]]
                           ) -> None:
    for name, value in state.items():
        if name in STATEFUL and hasattr(strategy, name):
            setattr(strategy, name, {k: np.asarray(v) for k, v in value.items()})
