"""The hospital's ClientApp: unpack the Message, call a plain function, pack the reply.

Replies hold the model weights, scalar metrics (with ``num-examples``) and the site's name:
never an image, a mask, a path or an ROI id; a failure's reply holds only its class.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from egcmf_model.config import Config, ModelConfig, from_dict
from egcmf_model.engine import build_model, pick_device
from egcmf_model.network import EGCMF

from .failures import PRIVACY_BUDGET_SPENT, public_error
from .faults import INFLATED_EXAMPLES, inject_fault
from .fedbn import restore_local_norms, save_local_norms
from .privacy import PrivacyLedger
from .site import IncompatibleFederation, SiteData, resolve_site
from .state import default_state_dir
from .train import local_evaluate, local_train, round_seed

log = logging.getLogger(__name__)
__all__ = ["PRIVACY_BUDGET_SPENT", "app", "make_client_app"]


def make_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp. Only a simulation passes ``defaults``: the partition file, ``simulation``
    (DP-SGD's sampling and noise then follow the seed), and the sites that misbehave on purpose
    (``faults``: site -> kind, with the centre's ``max-update-ratio`` for ``inflate``). The
    deployment's ``app`` has none: its DP noise draws from the operating system's entropy."""
    app = ClientApp()
    fixed = dict(defaults or {})
    networks = Networks()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _answer(msg, context, "training", lambda: _train(msg, context, fixed, networks),
                       networks)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _answer(msg, context, "evaluation",
                       lambda: _evaluate(msg, context, fixed, networks), networks)

    return app


class Networks:
    """The site's network, kept from one message to the next in a process that answers many
    (the site's runner): built once per model configuration, on the meta device (no random
    initialisation), and given each message's weights without a copy."""

    def __init__(self) -> None:
        self.key: tuple[ModelConfig, tuple[str, ...]] | None = None
        self.model: EGCMF | None = None

    def load(self, cfg: ModelConfig, classes: tuple[str, ...],
             state: dict[str, torch.Tensor], device: torch.device) -> EGCMF:
        """The network of ``cfg`` for ``classes`` holding ``state`` (its tensors, not copies)."""
        key = (dataclasses.replace(cfg, weights=""), classes)  # the weights come in ``state``
        if self.model is None or key != self.key:
            self.forget()
            with torch.device("meta"):
                self.model = build_model(key[0], classes)
            self.key = key
        self.model.load_state_dict(state, assign=True)
        return self.model.to(device)

    def forget(self) -> None:
        """Drop the network (after a failure: it may hold a half-done step's state)."""
        self.key = self.model = None


def _answer(msg: Message, context: Context, stage: str, work: Callable[[], Message],
            networks: Networks) -> Message:
    """``work()``'s reply; a failure becomes an error reply that says only its class."""
    try:
        return work()
    except Exception as exc:  # the centre learns the class of failure; the detail stays here
        networks.forget()
        site = str(dict(context.node_config).get("site", ""))
        return Message(error=public_error(exc, stage, site), reply_to=msg)


def _train(msg: Message, context: Context, fixed: dict[str, Any], networks: Networks
           ) -> Message:
    cfg, site, model, device = _setup(msg, context, fixed, networks)
    options = msg.content["config"]
    seed = round_seed(cfg.train.seed, int(options["server-round"]), site.name)
    mu = float(options.get("proximal-mu", 0.0))
    state = _state_dir(context, fixed) / site.name
    metrics = local_train(model, site.train, site.classes, cfg, device, seed, mu,
                          PrivacyLedger(state / "privacy.json"), site.name,
                          dp_seeded=bool(fixed.get("simulation")))
    if cfg.train.keep_norm_local:
        save_local_norms(model, _norms_file(state, options))
    weights = model.state_dict()
    fault = fixed.get("faults", {}).get(site.name)
    if fault is not None:
        weights = inject_fault(fault, weights, msg.content["arrays"].to_torch_state_dict(),
                               float(fixed.get("max-update-ratio", 0.0)))
        if fault == "inflate":
            metrics["num-examples"] = INFLATED_EXAMPLES
    return _reply(msg, site, metrics, ArrayRecord(weights))


def _evaluate(msg: Message, context: Context, fixed: dict[str, Any], networks: Networks
              ) -> Message:
    cfg, site, model, device = _setup(msg, context, fixed, networks)
    if fixed.get("faults", {}).get(site.name) == "dropout":
        inject_fault("dropout", {})
    return _reply(msg, site, local_evaluate(model, site.val, site.classes, cfg, device))


def _state_dir(context: Context, defaults: dict[str, Any]) -> Path:
    """Where this site keeps what must outlive a run (its privacy ledger, FedBN's layers):
    ``fl-client --state-dir``, the simulation's run folder, or the default state folder;
    never a cache."""
    node = dict(context.node_config)
    default = default_state_dir()
    return Path(str(node.get("state-dir", defaults.get("state-dir", default))))


def _norms_file(site_state: Path, options: ConfigRecord) -> Path:
    """FedBN's layers of this site in this federation; another federation starts afresh."""
    federation = str(options.get("federation-id", ""))
    name = f"fedbn-{federation}.pt" if federation else "fedbn.pt"
    return site_state / name


def _site_privacy(cfg: Config, node: dict[str, Any]) -> Config:
    """A site's own DP-SGD settings (fl-client --dp --epsilon --delta) override the server's."""
    if not node.get("dp"):
        return cfg
    dp = dataclasses.replace(cfg.dp, enabled=True,
                             epsilon=float(node.get("dp-epsilon", cfg.dp.epsilon)),
                             delta=float(node.get("dp-delta", cfg.dp.delta)))
    return dataclasses.replace(cfg, dp=dp)


def _setup(msg: Message, context: Context, defaults: dict[str, Any], networks: Networks
           ) -> tuple[Config, SiteData, torch.nn.Module, torch.device]:
    node = dict(context.node_config)
    cfg = from_dict(yaml.safe_load(str(msg.content["config"]["egcmf-config"])), "server config")
    cfg = _site_privacy(cfg, node)
    site = resolve_site(node, defaults)
    if tuple(cfg.data.classes) != site.classes:
        raise IncompatibleFederation(f"site {site.name}: classes {list(site.classes)} differ "
                                     f"from the federation's {list(cfg.data.classes)}")
    device = pick_device(str(node.get("device", defaults.get("device", "auto"))))
    torch.set_num_threads(int(defaults.get("threads", torch.get_num_threads())))
    model = networks.load(cfg.model, site.classes, msg.content["arrays"].to_torch_state_dict(),
                          device)
    if cfg.train.keep_norm_local:
        restore_local_norms(model, _norms_file(_state_dir(context, defaults) / site.name,
                                               msg.content["config"]))
    return cfg, site, model, device


def _reply(msg: Message, site: SiteData, metrics: dict[str, Any],
           arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


app = make_client_app()
