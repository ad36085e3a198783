"""Flower's own strategies, chosen by name and configured from the run settings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean", "krum")

# Flags shared by `fl-server start` and `sim/run.py`; each maps to the run-config key of its name.
AGGREGATION_FLAGS = (
    ("--proximal-mu", float, 0.01, "fedprox: weight of the proximal term the sites add"),
    ("--trim-fraction", float, 0.2, "trimmed-mean: share cut at each end, per coordinate"),
    ("--krum-f", int, 1, "krum: malicious sites tolerated"),
    ("--max-update-ratio", float, 10.0,
     "reject updates whose norm exceeds this x the median of the others"),
    ("--server-dp-noise", float, 0.0,
     "> 0: Flower's server-side client-level DP (fedavg), noise multiplier"),
    ("--server-dp-clip", float, 10.0, "server-side DP: clipping norm of each site's update"),
    ("--server-dp-epsilon", float, 0.0,
     "server-side DP: stop before a round that would exceed it (0: never)"),
)


def add_aggregation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", default="fedavg", choices=STRATEGIES)
    for flag, kind, default, text in AGGREGATION_FLAGS:
        parser.add_argument(flag, type=kind, default=default, help=text)


def aggregation_run_config(args: argparse.Namespace) -> dict[str, float]:
    """The run-config entries of the aggregation flags (``proximal-mu``, ...)."""
    return {flag[2:]: getattr(args, flag[2:].replace("-", "_")) for flag, *_ in AGGREGATION_FLAGS}


@dataclass(frozen=True)
class StrategyOptions:
    name: str = "fedavg"
    min_sites: int = 2  # sites that must connect, and the fewest whose updates are aggregated
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term the sites add
    trim_fraction: float = 0.2  # trimmed-mean: share cut at each end, per coordinate
    krum_f: int = 1  # krum: number of malicious sites tolerated
    server_lr: float = 0.01  # fedadam: server learning rate (eta)
    sites: int = 2  # sites taking part in every round (server-side DP samples all of them)
    server_dp_noise: float = 0.0  # > 0: Flower's server-side client-level DP (fixed clipping)
    server_dp_clip: float = 10.0  # clipping norm of each site's update
    server_dp_epsilon: float = 0.0  # > 0: stop when the next round would exceed it
    server_dp_delta: float = 1e-5


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


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """What a strategy learns across rounds, for the round checkpoint (empty for most)."""
    return {name: dict(getattr(strategy, name)) for name in STATEFUL
            if getattr(strategy, name, None)}


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    for name, value in state.items():
        if name in STATEFUL and hasattr(strategy, name):
            setattr(strategy, name, {k: np.asarray(v) for k, v in value.items()})
