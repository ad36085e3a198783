"""Flower's own strategies, chosen by name and configured from the run settings."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

STRATEGIES = ("fedavg",)


def make_strategy(name: str, min_sites: int) -> Strategy:
    """A Message-API strategy that trains and evaluates on every connected site (at least
    ``min_sites``), weighting by ``num-examples``."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                  min_evaluate_nodes=min_sites, min_available_nodes=min_sites)
