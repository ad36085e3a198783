"""Typed, frozen configuration loaded from YAML presets shipped in the package.

A configuration is built in three layers, each naming its source in any error:
the preset file (``tiny`` or ``paper``), an optional user YAML file, then ``key=value``
overrides from the command line (``model.width=0.5``). An unknown key or a value of the
wrong type is a :class:`ConfigError` that names the key and where it came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PRESETS = ("tiny", "paper")
VARIANTS = ("unet", "mrcfm", "mrfm", "mrfm+edm", "full")
ORIENTATIONS = 8  # of a tile: four 90-degree rotations, each with and without a flip


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and its source."""


def _choice(*values: str) -> dict[str, tuple[str, ...]]:
    return {"choices": values}


@dataclass(frozen=True)
class ModelConfig:
    # Table V ablation variant; mrfm is the H&E branch alone, for data without CK5/6
    variant: str = field(default="full", metadata=_choice(*VARIANTS))
    in_size: int = 64  # side H of the 10x input; the 40x ROI is 4H
    width: float = 0.125  # VGG16 channel multiplier (1.0 = the paper's widths)
    decoder_width: float = 0.5  # UNet decoder channels relative to the encoder level it joins
    norm: str = field(default="batch", metadata=_choice("batch", "group"))  # group for DP-SGD
    heads: int = 2  # heads of the axial cross-attention in MSFFM
    se_reduction: int = 8  # squeeze ratio of SE and channel-attention blocks
    # target decoder level (stride) Grad-CAM reads, upsampled; stride 8 pointed away from the
    # tumour in our measurements (bench/RESULTS.md), stride 4 onto it
    cam_stride: int = field(default=4, metadata=_choice(8, 4, 2))
    window_frac: float = 0.25  # key-region window side / H (128 px at H=512)
    stride_frac: float = 0.0625  # window search stride / H (H/16)
    # optional local file to initialise every encoder: a VGG16-BN state dict, or a checkpoint
    # of this network (each encoder from its counterpart, e.g. one trained on public data)
    weights: str = ""


@dataclass(frozen=True)
class LossConfig:
    gamma: float = 0.5  # weight of L_edge in L = L_seg + gamma * L_edge (eq. 9)
    edge_target: str = field(default="boundary", metadata=_choice("boundary", "mask"))
    edge_band: int = 2  # half-width in 10x pixels of the tumour boundary band


@dataclass(frozen=True)
class DataConfig:
    dataset: str = field(default="synthetic", metadata=_choice("synthetic", "sites", "bcss"))
    # the federation's classes; every site's site.yaml must list the same
    classes: tuple[str, ...] = ("background", "in_situ", "invasive")
    root: str = ""  # data folder; empty = the cached synthetic set
    partition: str = field(
        default="institution", metadata=_choice("iid", "dirichlet", "institution")
    )  # how a pooled data set is split into virtual sites
    alpha: float = 0.5  # Dirichlet concentration for label-skew partitions
    augment: bool = True  # flips and 90-degree rotations, identical for every modality
    stain_jitter: float = 0.0  # std of HED stain jitter; 0 disables it
    synth_sites: int = 5  # synthetic sites generated for the default data set
    synth_rois_per_site: int = 6  # synthetic ROIs per site
    synth_seed: int = 0  # seed of the synthetic generator
    bcss_val_fraction: float = 0.2  # share of non-test BCSS slides held out for validation


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2  # epochs of centralised training (local epochs per round in FL)
    batch_size: int = 2  # as the paper
    lr: float = 1e-4  # Adam, as the paper
    # over the whole run (all rounds of a federation): cosine decay to zero, or constant
    lr_schedule: str = field(default="cosine", metadata=_choice("cosine", "constant"))
    weight_decay: float = 0.0
    seed: int = 0  # drives model init, shuffling and augmentation
    num_workers: int = 0  # DataLoader workers; 0 keeps runs reproducible and light
    device: str = field(default="auto", metadata=_choice("auto", "cpu", "cuda"))
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU runs are already
    skip: bool = False  # benchmarks only: no training; sites return the weights, randomly moved
    # bf16 autocast on a GPU (ignored on the CPU, and in training under DP-SGD)
    amp: str = field(default="none", metadata=_choice("none", "bf16"))
    # channels-last memory on a GPU (ignored on the CPU, and in training under DP-SGD)
    channels_last: bool = False
    # the fusion modules compiled for training on a GPU with torch.compile, a minute or two
    # before the first step of each process (ignored on the CPU, under DP-SGD and with
    # train.deterministic)
    compile: bool = False
    keep_norm_local: bool = False  # FedBN: each site keeps its own normalisation layers


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = False  # DP-SGD (Opacus) at every site; needs model.norm=group
    epsilon: float = 8.0  # each site's total budget over all rounds
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample gradient clipping bound
    noise_multiplier: float = 0.0  # 0 = calibrated to spend epsilon over planned_rounds
    planned_rounds: int = 20  # rounds the noise is calibrated for
    # Under DP-SGD these replace train.batch_size and train.lr: each noisy step should average
    # many examples (a site with fewer than twice the batch takes one step per epoch over
    # all its tiles), and fewer, larger steps spend the budget on less noise.
    batch_size: int = 32  # expected batch of Poisson sampling
    # A site's optimiser starts afresh every round, and Adam's first step moves every weight
    # by the same lr, signal or noise alike: with one or a few steps a round, "sgd" (a step
    # along the noisy gradient) learns more (bench/RESULTS.md)
    optimizer: str = field(default="adam", metadata=_choice("adam", "sgd"))
    lr: float = 0.0  # 0 = the optimizer's own: 1e-2 for adam, 0.2 for sgd
    # Each tile's gradient is the mean over this many orientations of it (1 to 8), taken
    # before clipping: a steadier direction per tile at no privacy cost, this many times the
    # compute and activation memory (augmentation multiplicity; needs data.augment)
    augmentations: int = 1

    def step_size(self) -> float:
        """The learning rate DP-SGD trains with: ``lr``, or the optimizer's own."""
        return self.lr or {"adam": 1e-2, "sgd": 0.2}[self.optimizer]
    # What DP-SGD leaves as it is: "encoders" when they come from public data (model.weights),
    # so the noise falls on fewer weights; "none" trains everything.
    frozen: str = field(default="none", metadata=_choice("none", "encoders"))
    # A simulation on the built-in synthetic set takes its encoders from a network trained
    # without DP on a public synthetic set (the sites' generator seed + 777, no site's tile)
    # for this many epochs (0: no public network; the encoders start random)
    public_epochs: int = 30


@dataclass(frozen=True)
class Config:
    preset: str = field(default="tiny", metadata=_choice(*PRESETS))
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: PrivacyConfig = field(default_factory=PrivacyConfig)


def load_config(
    preset: str = "tiny",
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    defaults: typing.Sequence[str] = (),
) -> Config:
    """Build a :class:`Config` from a preset, an optional YAML file and ``key=value`` overrides.

    A user file may name its own base with a top-level ``preset:`` key. ``defaults`` are
    ``key=value`` strings put on the preset, below the file and the overrides.
    """
    user: dict[str, Any] = {}
    if path is not None:
        user = _read_yaml(Path(path))
        preset = user.get("preset", preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    preset_file = resources.files("egcmf_model.presets") / f"{preset}.yaml"
    cfg = _build(Config, yaml.safe_load(preset_file.read_text()) or {}, f"preset {preset}.yaml")
    if defaults:
        cfg = apply_overrides(cfg, defaults)
    if user:
        cfg = merge(cfg, user, str(path))
    return apply_overrides(cfg, overrides)


def budget_problem(epsilon: float, delta: float) -> str | None:
    """What is wrong with a DP budget of (``epsilon``, ``delta``), or None."""
    if epsilon > 0 and 0 < delta < 1:
        return None
    return (f"the privacy budget needs epsilon > 0 and 0 < delta < 1, not epsilon {epsilon:g}, "
            f"delta {delta:g} (--epsilon, --delta)")


def check_together(cfg: Config) -> Config:
    """The checks that span fields, made once every layer (preset, file, overrides) is in."""
    if cfg.dp.frozen == "encoders" and not cfg.model.weights:
        raise ConfigError("dp.frozen=encoders keeps the encoders as they start: give them with "
                          "model.weights (a checkpoint of this network trained on public data "
                          "with model.norm=group)")
    if problem := budget_problem(cfg.dp.epsilon, cfg.dp.delta):
        raise ConfigError(problem)
    if cfg.dp.public_epochs < 0:
        raise ConfigError(f"dp.public_epochs must be 0 or more, not {cfg.dp.public_epochs}")
    if not 1 <= cfg.dp.augmentations <= ORIENTATIONS:
        raise ConfigError(f"dp.augmentations must be 1 to {ORIENTATIONS} (the distinct "
                          f"orientations of a tile), not {cfg.dp.augmentations}")
    if cfg.dp.augmentations > 1 and not cfg.data.augment:
        raise ConfigError(f"dp.augmentations={cfg.dp.augmentations} averages over orientations "
                          "of each tile: it needs data.augment=true (or set "
                          "dp.augmentations=1; --dp on the built-in synthetic set sets 8)")
    return cfg


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars), all at once (a
    key given twice: the last wins), so that fields checked together may come in any order."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        _put(node, leaf, yaml.safe_load(raw) if raw.strip() else "")
    return check_together(merge(cfg, nested, "the command line") if nested else cfg)


def _put(node: dict[str, Any], key: str, value: Any) -> None:
    """``node[key] = value``; a mapping merges into a mapping already there, key by key."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for inner, item in value.items():
            _put(node[key], inner, item)
    else:
        node[key] = value


def merge(obj: Any, updates: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``updates`` applied, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {name!r}; known: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, source, f"{name}.")
        else:
            changes[key] = _check(value, hints[key], fields[key], name, source)
    return dataclasses.replace(obj, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps and checkpoints); tuples become lists."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {
        k: list(v) if isinstance(v, tuple) else v for k, v in items})


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Inverse of :func:`to_dict`, with the same checks as a YAML file."""
    return check_together(_build(Config, data, source))


def _build(cls: type, data: dict[str, Any], source: str) -> Any:
    return merge(cls(), data, source)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return data


def _check(value: Any, hint: Any, fld: dataclasses.Field, name: str, source: str) -> Any:
    if isinstance(hint, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {name} must be a list of strings, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        got = type(value).__name__
        raise ConfigError(f"{source}: {name} must be {hint.__name__}, got {got} {value!r}")
    choices = fld.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: {name}={value!r} is not one of {', '.join(choices)}")
    return value
