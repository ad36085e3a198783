"""DP-SGD at a site with Opacus, against a privacy budget that is accounted and enforced.

One RDP accountant per site accumulates every round's (noise multiplier, sample rate, steps);
its history is saved on the site's own disk after each round, because Flower's
``context.state`` lasts one run only and each ClientApp call may be a fresh process. Before a
round the site computes the epsilon it would reach; if that exceeds its budget it refuses to
train (it still evaluates).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from egcmf_model.config import PrivacyConfig

from .site import IncompatibleFederation

if TYPE_CHECKING:  # Opacus is imported where DP-SGD runs: it costs seconds at every start
    from opacus.optimizers import DPOptimizer

log = logging.getLogger(__name__)


class BudgetExhausted(RuntimeError):
    """Training this round would spend more privacy than the site's budget allows."""


class PrivacyLedger:
    """The accountant's history for one site, kept in ``path`` (JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[tuple[float, float, int]] = []
        if path.exists():
            self.history = [tuple(h) for h in json.loads(path.read_text())["history"]]

    def epsilon(self, delta: float, extra: list[tuple[float, float, int]] = ()) -> float:
        if not self.history and not extra:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [*self.history, *extra]
        return float(accountant.get_epsilon(delta))

    def save(self, history: list[tuple[float, float, int]]) -> None:
        self.history = [tuple(h) for h in history]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"history": [list(h) for h in self.history]}))
        tmp.replace(self.path)


def check_compatible(model: torch.nn.Module) -> None:
    """Opacus's validator: no BatchNorm (per-sample gradients need GroupNorm), among others."""
    from opacus.validators import ModuleValidator

    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise IncompatibleFederation(
            f"the federation's model is not DP-SGD compatible ({errors[0]}); the centre must "
            "use GroupNorm: --set model.norm=group (fl-server --dp)")


class EmptyAsNone:
    """Collate function that turns the empty batches of Poisson sampling into ``None``."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list[Any]) -> Any:
        return self.collate(batch) if batch else None


def noise_only_step(optimizer: DPOptimizer) -> Callable[[], None]:
    """DP-SGD's step for a batch that Poisson sampling left empty: no gradient, only noise.

    The accountant assumes a noisy step for every batch; skipping the empty ones would reveal
    that a batch was empty.
    """
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
    return step


def average_views(optimizer: DPOptimizer, views: int) -> Callable[[], None]:
    """Before DP-SGD clips: each tile's per-sample gradient becomes the mean over its
    ``views`` orientations (consecutive rows of the batch; ``make_loader(views=...)``).

    Clipping then bounds each tile's whole contribution by the clipping norm, as for one
    view, so the privacy accounting is unchanged; the mean over orientations points more
    steadily than any one of them (augmentation multiplicity, De et al. 2022).
    """
    def average() -> None:
        for p in optimizer.params:
            grads = p.grad_sample
            if grads.shape[0] % views:
                raise ValueError(f"a batch of {grads.shape[0]} rows cannot hold {views} "
                                 "orientations of each tile")
            p.grad_sample = grads.unflatten(0, (grads.shape[0] // views, views)).mean(1)
    return average


def dp_generators(seed: int | None, device: torch.device
                  ) -> tuple[torch.Generator, torch.Generator]:
    """DP-SGD's two sources of randomness, separate: Poisson sampling's generator (on the CPU,
    where Opacus draws the batches) and the noise's (on the model's device).

    ``seed`` None, a deployment: each is seeded with 64 bits of the operating system's entropy,
    so nobody who knows the federation's seed (the centre sends it) can replay the noise and
    subtract it. An int, a simulation: both derive from it, and the run is reproducible.
    """
    if seed is None:
        seeds = [secrets.randbits(64), secrets.randbits(64)]
    else:
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(2, np.uint64)]
    return (torch.Generator().manual_seed(seeds[0]),
            torch.Generator(device=device).manual_seed(seeds[1]))


def plan(dp: PrivacyConfig, sample_rate: float, steps: int, site: str = "") -> float:
    """Noise multiplier: as configured, or calibrated to reach epsilon after planned rounds."""
    if dp.noise_multiplier > 0:
        return dp.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    rounds = max(1, dp.planned_rounds)
    try:
        return float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta,
                                          sample_rate=sample_rate, steps=steps * rounds))
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise BudgetExhausted(
            f"site {site}: a privacy budget of epsilon {dp.epsilon:g} (delta {dp.delta:g}) is "
            f"too small for {rounds} rounds of {steps} step(s) at sample rate "
            f"{sample_rate:.3g}: no noise level reaches it; raise --epsilon, or plan fewer "
            "rounds (dp.planned_rounds)") from exc


def make_private(model, optimizer, loader, dp: PrivacyConfig, ledger: PrivacyLedger,
                 epochs: int, site: str, noise: torch.Generator):
    """Opacus-wrapped (model, optimizer, loader) and the engine, after the budget check.

    Poisson sampling draws from ``loader.generator``, the noise from ``noise`` (both from
    :func:`dp_generators`)."""
    from opacus import PrivacyEngine

    check_compatible(model)
    sample_rate = 1 / len(loader)  # as Opacus defines it for its Poisson-sampled loader
    steps = epochs * len(loader)
    sigma = plan(dp, sample_rate, steps, site)
    after = ledger.epsilon(dp.delta, [(sigma, sample_rate, steps)])
    if after > dp.epsilon * (1 + 1e-6):
        raise BudgetExhausted(f"site {site}: privacy budget spent: this round would bring "
                              f"epsilon from {ledger.epsilon(dp.delta):.3f} to {after:.3f} > "
                              f"{dp.epsilon:g} (delta {dp.delta:g}); not training")
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(ledger.history)
    module, optimizer, poisson = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
        noise_generator=noise)
    # Opacus builds an empty batch from the first batch's structure, which fails on our ROI ids
    # (strings) and when the very first batch is empty; we mark empty batches ourselves.
    poisson.collate_fn = EmptyAsNone(loader.collate_fn)
    log.info("site %s: DP-SGD with noise %.3f, clip %.2f, sample rate %.3f", site, sigma,
             dp.max_grad_norm, sample_rate)
    return module, optimizer, poisson, engine
