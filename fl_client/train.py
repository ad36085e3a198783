"""What a hospital does with the global model: train it locally, or evaluate it, on its own data.

Plain functions over the model package; the ClientApp only translates Messages to and from them.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import zlib
from typing import Any

import numpy as np
import torch

from egcmf_model.config import Config
from egcmf_model.data.source import RoiRecord
from egcmf_model.engine import (
    GpuSpeed,
    evaluate,
    frozen_parameters,
    lr_schedule,
    seed_everything,
    train_epoch,
)
from egcmf_model.losses import EGCMFLoss
from egcmf_model.trainer import make_loader

from .privacy import (
    PrivacyLedger,
    average_views,
    dp_generators,
    make_private,
    noise_only_step,
)

log = logging.getLogger(__name__)
NO_DP = -1.0  # the "epsilon" and noise multiplier a site reports when it does not train with DP-SGD
STAND_IN_SCALE = 1e-4  # train.skip: the size of the random step that stands in for training
NOISE_PERIOD = 1_000_003  # train.skip: values of noise drawn (a prime)


def round_seed(seed: int, server_round: int, site: str) -> int:
    """A seed for this site and round, the same on every machine and in every run."""
    return int(np.random.SeedSequence([seed, server_round, zlib.crc32(site.encode())])
               .generate_state(1)[0])


def round_progress(server_round: int, rounds: int) -> tuple[float, float] | None:
    """Round r of R spans ``((r-1)/R, r/R)`` of the run's learning-rate schedule; None when the
    server did not say how many rounds there are (the rate then stays constant)."""
    if rounds <= 0:
        return None
    return (server_round - 1) / rounds, min(server_round, rounds) / rounds


def local_train(model: torch.nn.Module, records: list[RoiRecord], classes: tuple[str, ...],
                cfg: Config, device: torch.device, seed: int, proximal_mu: float = 0.0,
                ledger: PrivacyLedger | None = None, site: str = "",
                progress: tuple[float, float] | None = None, steps: int | None = None,
                dp_seeded: bool = False) -> dict[str, float]:
    """``cfg.train.epochs`` local epochs of Adam on ``records`` (or exactly ``steps`` optimiser
    steps; under DP-SGD, ``cfg.dp.optimizer``); mean loss of the last epoch, ``num-examples``
    and ``steps``.

    ``seed`` drives shuffling and augmentation. ``progress``: the fraction of the whole run
    done before and after this call, which places it on ``cfg.train.lr_schedule`` (a
    federation's round r of R is ``((r-1)/R, r/R)``); None keeps the learning rate constant.
    Under DP-SGD (``cfg.dp.enabled``) the loss is per sample, and Poisson sampling and noise
    draw from the OS's entropy unless ``dp_seeded`` (simulations only: then they follow
    ``seed``). With ``cfg.train.skip`` (benchmarks of the federation's own cost) nothing is
    trained: :func:`stand_in_update` moves the weights.
    """
    frozen = frozen_parameters(model, cfg.dp)
    if cfg.train.skip:
        stand_in_update(model, seed, keep=frozen)
        return {"train_loss": 0.0, "num-examples": len(records), "train_s": 0.0,
                "epsilon": NO_DP, "noise_multiplier": NO_DP, "site-weight": 1, "steps": 0}
    if steps is not None and cfg.dp.enabled:
        raise ValueError("DP-SGD accounts whole epochs; train it by epochs, not steps")
    if cfg.dp.enabled:  # DP-SGD's own batch size and learning rate
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, batch_size=cfg.dp.batch_size, lr=cfg.dp.step_size()))
    generator = seed_everything(seed % 2**31, cfg.train.deterministic)
    noise = None
    if cfg.dp.enabled:
        generator, noise = dp_generators(seed if dp_seeded else None, device)
    loader = make_loader(records, classes, _with_seed(cfg, seed), train=True,
                         generator=generator, views=cfg.dp.augmentations if cfg.dp.enabled else 1)
    views = loader.dataset.views  # as the batches hold them
    speed = training_speed(cfg)
    speed.place(model, device)  # before Opacus wraps it (an evaluation may have moved it)
    trainable = set_trainable(model, frozen)
    sgd = cfg.dp.enabled and cfg.dp.optimizer == "sgd"
    optimizer = (torch.optim.SGD if sgd else torch.optim.Adam)(
        trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if proximal_mu > 0:
        add_proximal_term(optimizer, proximal_mu)
    loss_fn = training_loss(cfg)
    stats: dict[str, float] = {}
    start = time.perf_counter()
    examples, trained, engine = len(loader.dataset), model, None
    on_empty = before_step = None
    if cfg.dp.enabled:
        if ledger is None:
            raise ValueError("DP-SGD needs a privacy ledger (the site's state folder)")
        trained, optimizer, loader, engine = make_private(model, optimizer, loader, cfg.dp,
                                                          ledger, cfg.train.epochs, site, noise)
        on_empty = noise_only_step(optimizer)
        if views > 1:
            before_step = average_views(optimizer, views)
    total = steps if steps is not None else cfg.train.epochs * len(loader)
    scheduler = lr_schedule(optimizer, cfg.train.lr_schedule, progress, total)
    done = epoch = 0
    while done < steps if steps is not None else epoch < cfg.train.epochs:
        loader.dataset.set_epoch(epoch)
        batches = loader if steps is None else itertools.islice(loader, steps - done)
        stats = train_epoch(trained, batches, optimizer, device, loss_fn,
                            on_empty=on_empty, scheduler=scheduler,
                            speed=speed, before_step=before_step)
        done, epoch = done + stats["steps"], epoch + 1
        if not stats["steps"]:
            break
    epsilon = sigma = NO_DP
    if engine is not None:
        ledger.save(engine.accountant.history)
        epsilon, sigma = ledger.epsilon(cfg.dp.delta), float(optimizer.noise_multiplier)
        for param in trainable:  # leave the plain model behind, as it came in
            if hasattr(param, "grad_sample"):
                del param.grad_sample
        trained.remove_hooks()
    return {"train_loss": float(stats.get("loss", float("nan"))), "num-examples": examples,
            "train_s": time.perf_counter() - start, "epsilon": epsilon, "noise_multiplier": sigma,
            "site-weight": 1,  # for aggregations that count sites, not tiles
            "steps": done}


def set_trainable(model: torch.nn.Module, frozen: set[str]) -> list[torch.nn.Parameter]:
    """The parameters to train: all but those named in ``frozen`` (which then keep the
    weights they came with)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return [p for p in model.parameters() if p.requires_grad]


def stand_in_update(model: torch.nn.Module, seed: int, scale: float = STAND_IN_SCALE,
                    keep: set[str] | frozenset[str] = frozenset()) -> None:
    """What ``train.skip`` does instead of training: every float weight (but ``keep``, the
    weights frozen under DP-SGD) moves by a step of
    ``scale``, Gaussian noise drawn from ``seed`` (a stretch of ``NOISE_PERIOD`` values,
    repeated; a prime period, so no two 5 MiB chunks of a message repeat each other). A real
    update changes every value; returning the weights untouched would let Flower skip sending
    objects it already holds, and a zero float16 update is one chunk repeated, so a benchmark
    would count fewer bytes than a federation sends."""
    noise = torch.randn(NOISE_PERIOD, generator=torch.Generator().manual_seed(seed % 2**63))
    noise *= scale
    offset = 0
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or name in keep:
                continue
            # the noise read cyclically, in place (channels-last tensors: through a copy)
            target = tensor if tensor.is_contiguous() else tensor.contiguous()
            flat, done = target.view(-1), 0
            while done < flat.numel():
                start = (offset + done) % NOISE_PERIOD
                take = min(flat.numel() - done, NOISE_PERIOD - start)
                flat[done:done + take].add_(noise[start:start + take].to(flat.device, flat.dtype))
                done += take
            if target is not tensor:
                tensor.copy_(target)
            offset += tensor.numel()


def training_speed(cfg: Config) -> GpuSpeed:
    """The GPU speed options a site trains with: ``train.amp``, ``train.channels_last`` and
    ``train.compile``, but none under DP-SGD. Opacus needs every layer called as itself, and
    it computes a convolution's per-sample gradients from its input read as standard (NCHW)
    memory: from channels-last memory they come out wrong. Under bf16
    autocast it clips per-sample gradients held in bf16, and one sample's clipped gradient
    measured up to 0.4 % above the clipping norm that the accounting assumes."""
    return GpuSpeed() if cfg.dp.enabled else GpuSpeed.of(cfg.train)


def training_loss(cfg: Config) -> EGCMFLoss:
    """Per sample under DP-SGD, so that no sample's gradient depends on another's."""
    return EGCMFLoss(cfg.loss.gamma, per_sample=cfg.dp.enabled)


def add_proximal_term(optimizer: torch.optim.Optimizer, mu: float) -> None:
    """FedProx: the gradient of (mu / 2) * ||w - w_global||^2, i.e. mu * (w - w_global), with
    w_global the weights received this round, added to every gradient just before each step.

    Under DP-SGD the step comes after clipping and noise: the term depends on the weights alone,
    never on a sample, so adding it is post-processing and spends no privacy. (Added to the loss
    instead, it would be lost: Opacus rebuilds the gradient from per-sample gradients.)
    """
    anchors = {p: p.detach().clone() for group in optimizer.param_groups
               for p in group["params"]}

    def pull_towards_global(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, anchor in anchors.items():
            if p.grad is not None:
                p.grad.add_(p.detach() - anchor, alpha=mu)

    optimizer.register_step_pre_hook(pull_towards_global)


def local_evaluate(model: torch.nn.Module, records: list[RoiRecord], classes: tuple[str, ...],
                   cfg: Config, device: torch.device) -> dict[str, Any]:
    """The paper's metrics on ``records``, plus the confusion matrix as a flat list of counts."""
    if cfg.train.skip:
        k = len(classes)
        return {"dice": 0.0, "miou": 0.0, "acc": 0.0, "loss": 0.0, "num-examples": len(records),
                "confusion": [0] * (k * k), "site-weight": 1}
    loader = make_loader(records, classes, cfg, train=False)
    result = evaluate(model, loader, classes, device, EGCMFLoss(cfg.loss.gamma),
                      GpuSpeed.of(cfg.train))
    return {"dice": _finite(result["dice"]), "miou": _finite(result["miou"]),
            "acc": _finite(result["acc"]), "loss": float(result["loss"]),
            "num-examples": int(result["num-examples"]),
            "confusion": [int(c) for row in result["confusion"] for c in row], "site-weight": 1}


def _finite(value: float) -> float:
    """Metrics of a site whose validation tiles hold no annotated class are 0, not NaN."""
    return 0.0 if value != value else float(value)


def _with_seed(cfg: Config, seed: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed % 2**31))
