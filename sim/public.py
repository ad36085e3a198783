"""The public network a DP-SGD simulation on the built-in synthetic set takes its encoders from.

DP-SGD's noise falls on every weight it trains, and a few dozen tiles per site carry too
little signal for 1.2 M noisy weights at epsilon 8 (bench/RESULTS.md). The usual remedy is
to start from encoders trained on public data and leave them as they are under DP. With no
public slides here, the public data is the synthetic generator under another seed: other
hospitals, none of the sites' tiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from egcmf_model.config import Config, DataConfig, PrivacyConfig, apply_overrides, to_yaml
from egcmf_model.data.source import cache_dir
from egcmf_model.data.synthetic import generator_version

log = logging.getLogger("sim")
PUBLIC_SEED_OFFSET = 777  # the public set's generator seed: the sites' seed + this
# What --dp changes on the built-in synthetic set at the tiny preset, below --config, --set
# and the flags (bench/RESULTS.md). A site's 8 training tiles are fewer than DP-SGD's batch
# of 32, so every step takes them all (Poisson sampling at rate 1): one local epoch a round
# is one step, and more epochs only spread the budget over noisier steps. Each tile's
# gradient is the mean over its 8 orientations before clipping, and the step goes along the
# noisy gradient (SGD at its 0.2) rather than Adam's equal step for every weight: a gain of
# 0.06-0.15 Dice over three seeds, against 0.03 (seed 0) for Adam alone.
DP_BUILT_IN = ("train.epochs=1", "dp.optimizer=sgd", "dp.augmentations=8")
PUBLIC_RECIPE = 1  # raise when the public network's training changes (renames its cache)
PREFIX = "public_"  # of the public networks' folders in the data cache


def built_in_synthetic(cfg: Config) -> bool:
    """Whether ``cfg`` trains on the built-in synthetic set (generated, not a folder given)."""
    return cfg.data.dataset == "synthetic" and not cfg.data.root


def with_public_encoders(cfg: Config, train: bool = True, freeze: bool = True) -> Config:
    """``cfg`` with its encoders from the public network, where it applies: DP-SGD on the
    built-in synthetic set, no ``model.weights`` given, ``dp.public_epochs`` > 0; frozen
    under DP unless ``freeze`` is False (the user chose ``dp.frozen`` for themselves).
    ``train=False``: where the network is or would be, without training it."""
    if not (cfg.dp.enabled and cfg.dp.public_epochs > 0 and built_in_synthetic(cfg)):
        return cfg
    here = public_folder(public_config(cfg)) / "best.pt"
    if cfg.model.weights and not names_public_network(cfg.model.weights, here):
        return cfg
    if cfg.model.weights and Path(cfg.model.weights).expanduser() != here:
        log.info("DP-SGD: model.weights %s is not at hand; it names the public network of this "
                 "configuration, which is used from (or trained into) %s", cfg.model.weights,
                 here.parent)
    path = public_network(cfg) if train else here
    return apply_overrides(cfg, [f"model.weights={path}",
                                 *(["dp.frozen=encoders"] if freeze else [])])


def names_public_network(weights: str, here: Path) -> bool:
    """Whether ``weights`` is this configuration's public network as a run folder's
    ``config.yaml`` records it: this machine's cached copy, or a cached copy that is no longer
    at hand (another machine's, another PyTorch's, or a cleared cache), which is then trained
    again here."""
    given = Path(weights).expanduser()
    return given == here or (given.name == here.name and given.parent.name.startswith(PREFIX)
                             and not given.is_file())


def public_config(cfg: Config) -> Config:
    """The public network's configuration: the run's network, trained without DP for
    ``dp.public_epochs`` epochs on the synthetic set of seed ``synth_seed + 777``."""
    pooled = DataConfig()  # the public network trains on its pooled set: no partition
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, weights=""),
        data=dataclasses.replace(cfg.data, synth_seed=cfg.data.synth_seed + PUBLIC_SEED_OFFSET,
                                 partition=pooled.partition, alpha=pooled.alpha),
        train=dataclasses.replace(cfg.train, epochs=cfg.dp.public_epochs),
        dp=PrivacyConfig())


def public_folder(public: Config) -> Path:
    """Where the network of configuration ``public`` is kept: named by that configuration and
    by the versions of the code that would train it differently (data generator, this
    module's recipe, PyTorch), so a cached network is never stale."""
    return cache_dir() / f"{PREFIX}{hashlib.sha256(_identity(public).encode()).hexdigest()[:12]}"


def _identity(public: Config) -> str:
    return f"{_versions()}{to_yaml(public)}"


def _versions() -> str:
    return (f"generator {generator_version()}\nrecipe {PUBLIC_RECIPE}\n"
            f"torch {torch.__version__}\n")


def public_network(cfg: Config) -> Path:
    """The public network's checkpoint (``best.pt``), trained once and kept in the data cache."""
    public = public_config(cfg)
    target = public_folder(public)
    if (target / "best.pt").exists():
        log.info("DP-SGD: encoders from the public network in %s", target)
        return target / "best.pt"
    log.info("DP-SGD: training the public network once (%d epochs on the synthetic set of "
             "seed %d, no site's data) into %s", public.train.epochs, public.data.synth_seed,
             target)
    from egcmf_model.trainer import fit

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _random_state_kept():  # the run's own randomness must not depend on the cache
            result = fit(public, tmp)
        log.info("DP-SGD: public network trained (Dice %.3f on its own validation ROIs)",
                 result["best_dice"])
        (tmp / "last.pt").unlink()  # only best.pt is used
        (tmp / "config.yaml").write_text(to_yaml(public))
        (tmp / "versions.txt").write_text(_versions())
        tmp.rename(target)
    except OSError:  # another run finished first: keep its copy
        if not (target / "best.pt").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "best.pt"


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
