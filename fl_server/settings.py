"""The federation's round settings, declared once.

Every default below is the only one: ``fl-server start`` and ``sim/run.py`` build their flags
from these fields, ``fl-server start`` writes the app's run-config table from them, and the
ServerApp reads its run config back into this dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from fl_common import WIRE_DTYPES

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean", "krum")


def _setting(default: Any, text: str = "", flag: str = "", choices: tuple[str, ...] = ()
             ) -> Any:
    """A field with its command-line flag (``flag``, default ``--<kebab-name>``) and help."""
    return field(default=default, metadata={"help": text, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class FederationSettings:
    run_dir: str = ""  # run folder on the server: checkpoints, metrics, summary
    num_rounds: int = _setting(14, "federated rounds", "--rounds")
    min_sites: int = _setting(2, "sites that must be connected before a round starts, and the "
                                 "fewest valid updates a round aggregates")
    strategy: str = _setting("fedavg", "aggregation strategy", choices=STRATEGIES)
    resume: bool = False  # continue after the last checkpointed round
    config_file: str = ""  # resolved EGCMF config (YAML) on the server; empty = tiny preset
    timeout: float = _setting(3600.0, "seconds a round waits for the sites' replies; a site "
                                      "still busy then is left out of that round",
                              "--round-timeout")
    max_update_ratio: float = _setting(10.0, "reject updates whose norm exceeds this x the "
                                             "median norm of all the round's updates")
    norm_floor: float = _setting(0.01, "the norm rule never compares with a median below this "
                                       "norm: updates up to max-update-ratio x this always pass")
    norm_clip: float = _setting(1.0, "clip every update to this x the median norm before "
                                     "averaging (0: off; not with server-side DP, which clips "
                                     "at --server-dp-clip)")
    proximal_mu: float = _setting(0.01, "fedprox: weight of the proximal term the sites add")
    trim_fraction: float = _setting(0.2, "trimmed-mean: share cut at each end, per coordinate")
    krum_f: int = _setting(1, "krum: malicious sites tolerated")
    server_lr: float = 0.01  # fedadam: server learning rate (eta)
    # Sites in the federation: the registered keys (fl-server start) or the virtual sites
    # (simulation); 0 = unknown (--insecure), then min_sites stands in.
    sites: int = 0
    server_dp_noise: float = _setting(0.0, "> 0: Flower's server-side client-level DP "
                                           "(fedavg), noise multiplier")
    server_dp_clip: float = _setting(10.0, "server-side DP: clipping norm of each site's update")
    server_dp_epsilon: float = _setting(0.0, "server-side DP: stop before a round that would "
                                             "exceed it (0: never)")
    server_dp_delta: float = 1e-5
    wire: str = _setting("float16", "how the model travels: float16 (half the bytes: the "
                                    "sites get the model rounded to float16 and send their "
                                    "update in float16, which the centre adds to its float32 "
                                    "model), or float32", choices=WIRE_DTYPES)
    keep_checkpoints: int = _setting(3, "round checkpoints kept, the newest (resume needs only "
                                        "the last); best.pt and final.pt are kept besides")
    # Deployment: JSON {node id: site} of the keys the centre registered; "" in simulation.
    site_nodes: str = ""
    # JSON {site: {"train": N, "evaluate": M}}: the most examples each site's replies may
    # claim (simulation: its partition's tiles; deployment: the cap registered with its key).
    site_caps: str = ""
    # Set by sim/run.py when it builds the ServerApp, never by a run config: server-side DP
    # noise then follows the seed (reproducible); in a deployment it draws from OS entropy.
    simulation: bool = False

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], defaults: dict[str, Any]
                        ) -> FederationSettings:
        """Settings from Flower's run config (kebab-case keys), falling back to ``defaults``."""
        merged = {**defaults, **{k: v for k, v in dict(run_config).items()
                                 if k not in APP_ONLY}}
        hints = typing.get_type_hints(cls)
        values = {f.name: hints[f.name](merged[run_config_key(f.name)])
                  for f in dataclasses.fields(cls) if run_config_key(f.name) in merged}
        if not values.get("run_dir"):
            raise ValueError("run config needs run-dir: where checkpoints and metrics go")
        return cls(**values)

    def node_sites(self) -> dict[int, str]:
        """Registered node id -> site name (empty in simulation)."""
        return {int(k): str(v) for k, v in json.loads(self.site_nodes or "{}").items()}

    def caps(self, stage: str) -> dict[str, int]:
        """Site -> the most examples its ``stage`` (train, evaluate) replies may claim."""
        return {site: int(v[stage]) for site, v in json.loads(self.site_caps or "{}").items()}

    def federation_size(self) -> int:
        return self.sites or self.min_sites


DEFAULTS = FederationSettings()


def check_keep_checkpoints(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"--keep-checkpoints must be at least 1 (resume needs the last "
                         f"round's checkpoint), got {keep}")


APP_ONLY = ("simulation",)  # settings the app is built with, which a run config cannot change


def run_config_key(name: str) -> str:
    return name.replace("_", "-")


def run_config_defaults() -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` table: every setting with its default."""
    return {run_config_key(f.name): getattr(DEFAULTS, f.name)
            for f in dataclasses.fields(FederationSettings)
            if run_config_key(f.name) not in APP_ONLY}


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + run_config_key(f.name)


def add_settings_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Add the flags of the settings ``names``, each with its one default."""
    fields = {f.name: f for f in dataclasses.fields(FederationSettings)}
    hints = typing.get_type_hints(FederationSettings)
    for name in names:
        f = fields[name]
        flag = _flag(f)
        choices = f.metadata.get("choices")
        extra = ({"choices": choices} if choices
                 else {"metavar": flag[2:].upper().replace("-", "_")})
        parser.add_argument(flag, dest=name, type=hints[name], default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})", **extra)


def settings_from_args(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The run-config entries (kebab-case) of the settings ``names`` as parsed."""
    return {run_config_key(name): getattr(args, name) for name in names}


# Strategy options, update validation and the run folder: settings that fl-server start and
# sim/run.py both pass to the ServerApp as they are; with the three below, the flags of both.
AGGREGATION_FLAGS = ("proximal_mu", "trim_fraction", "krum_f", "max_update_ratio",
                     "norm_floor", "norm_clip", "server_dp_noise", "server_dp_clip",
                     "server_dp_epsilon")
# Settings of how the centre runs, not of what the run is: a resume may change them, so they
# travel to the ServerApp beside the run-defining settings, never in settings.json.
RUN_FREE_FLAGS = ("wire", "keep_checkpoints")
SERVER_FLAGS = (*AGGREGATION_FLAGS, *RUN_FREE_FLAGS)
ROUND_FLAGS = ("num_rounds", "min_sites", "strategy", *SERVER_FLAGS)
# What a resumed run keeps from its checkpoint: any change is refused, except num_rounds
# growing, and sites where no server-side DP accountant counts them. The wire and the number of
# checkpoints kept may change.
RUN_DEFINING = ("num_rounds", "min_sites", "strategy", *AGGREGATION_FLAGS, "server_lr",
                "server_dp_delta", "sites")
