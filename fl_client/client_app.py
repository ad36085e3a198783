"""The hospital's ClientApp: unpack the Message, call a plain function, pack the reply.

A training message may also ask the site to evaluate the model it brings (``evaluate`` in its
configuration): the site then evaluates the received global model before it trains on it, and
the reply holds both, so each round's model travels to the site once. Replies hold the model's
packed buffers (:mod:`fl_common.wire`), scalar metrics (with ``num-examples``) and the site's
name: never an image, a mask, a path or an ROI id; a failure's reply holds only its class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from egcmf_model.config import Config, from_dict
from egcmf_model.engine import pick_device
from fl_common import VERSION_KEY, package_version
from fl_common.replies import (
    ARRAYS,
    EVALUATE_METRICS,
    EVALUATION,
    FAILURE,
    METRICS,
    SITE,
    TRAIN_METRICS,
)
from fl_common.wire import WIRE_DTYPES

from .failures import PRIVACY_BUDGET_SPENT, public_error
from .faults import INFLATED_EXAMPLES, POISONED, inject_fault, misshape
from .fedbn import restore_local_norms, save_local_norms
from .model_io import Networks, Received, reply_arrays
from .privacy import PrivacyLedger
from .site import IncompatibleFederation, SiteData, resolve_site
from .state import default_state_dir
from .train import local_evaluate, local_train, round_progress, round_seed

log = logging.getLogger(__name__)
__all__ = ["PRIVACY_BUDGET_SPENT", "app", "make_client_app"]


def make_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp. Only a simulation passes ``defaults``: the partition file, ``simulation``
    (DP-SGD's sampling and noise then follow the seed), the file its sites log to
    (``site-log``), and the sites that misbehave on purpose (``faults``: site -> kind, with
    the centre's ``max-update-ratio`` for ``inflate``). The
    deployment's ``app`` has none: its DP noise draws from the operating system's entropy."""
    app = ClientApp()
    fixed = dict(defaults or {})
    networks = Networks()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        with _site_log(context, fixed):
            return _answer(msg, context, "training", networks,
                           lambda: _train(_setup(msg, context, fixed, networks), fixed, networks))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        with _site_log(context, fixed):
            return _answer(msg, context, "evaluation", networks,
                           lambda: _evaluate(_setup(msg, context, fixed, networks), fixed))

    return app


@contextlib.contextmanager
def _site_log(context: Context, defaults: dict[str, Any]) -> Iterator[None]:
    """In a simulation, the site's warnings and errors (tracebacks included) while it answers a
    message go to the file ``site-log``, each line naming the site: a real site's operator
    reads the site's own log, and a simulation's workers have no console of their own."""
    path = defaults.get("site-log")
    if not path:
        yield
        return
    site = resolve_site(dict(context.node_config), defaults).name
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # made at the first line
    handler.setLevel(logging.WARNING)
    handler.setFormatter(SiteLogFormat(site))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class SiteLogFormat(logging.Formatter):
    """``TIME LEVEL site "NAME": message``, the name as a JSON string, and every further line
    of the entry (a message's own, a traceback's) indented: no file name or message a site
    logs can pass for an entry of its own or of another site."""

    def __init__(self, site: str) -> None:
        name = json.dumps(site).replace("%", "%%")
        super().__init__(f"%(asctime)s %(levelname)s site {name}: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\n    ")


@dataclass(frozen=True)
class Job:
    """What a message asks of this site, with the network holding the received model."""

    msg: Message
    cfg: Config
    site: SiteData
    model: torch.nn.Module
    received: Received
    device: torch.device
    state_dir: Path  # this site's own state folder

    @property
    def options(self) -> ConfigRecord:
        return self.msg.content["config"]


def _answer(msg: Message, context: Context, stage: str, networks: Networks,
            work: Callable[[], Message]) -> Message:
    """``work()``'s reply; a failure becomes an error reply that says only its class."""
    try:
        reply = work()
    except Exception as exc:  # the centre learns the class of failure; the detail stays here
        networks.forget()
        site = str(dict(context.node_config).get("site", ""))
        return Message(error=public_error(exc, stage, site), reply_to=msg)
    networks.release()  # the reply holds copies; 300 MB less while the site waits
    return reply


def _train(job: Job, fixed: dict[str, Any], networks: Networks) -> Message:
    """Evaluate the received model if asked, then train it; a training that fails after the
    evaluation still returns the evaluation, with the class of the failure."""
    content = RecordDict()
    if job.options.get("evaluate"):
        content[EVALUATION] = _metrics(_evaluation(job, fixed), EVALUATE_METRICS)
    try:
        metrics, arrays = _training(job, fixed)
    except Exception as exc:
        if EVALUATION not in content:
            raise
        networks.forget()
        error = public_error(exc, "training", job.site.name)
        content[FAILURE] = ConfigRecord({"code": error.code, "reason": error.reason})
    else:
        content[METRICS], content[ARRAYS] = _metrics(metrics, TRAIN_METRICS), arrays
    content[SITE] = ConfigRecord({"name": job.site.name})
    return Message(content=content, reply_to=job.msg)


def _metrics(metrics: dict[str, Any], expected: frozenset[str]) -> MetricRecord:
    """The metrics in the schema the centre checks (:mod:`fl_common.replies`)."""
    if set(metrics) != expected:
        raise RuntimeError(f"reply metrics {sorted(metrics)} differ from {sorted(expected)}")
    return MetricRecord(metrics)


def _training(job: Job, fixed: dict[str, Any]) -> tuple[dict[str, Any], ArrayRecord]:
    cfg, site, options = job.cfg, job.site, job.options
    wire, fault = _wire(options), fixed.get("faults", {}).get(site.name)
    layout = job.received.layout
    start = layout.unpack(job.received.weights()) if fault in POISONED else None
    rnd = int(options["server-round"])
    seed = round_seed(cfg.train.seed, rnd, site.name)
    metrics = local_train(job.model, site.train, site.classes, cfg, job.device, seed,
                          float(options.get("proximal-mu", 0.0)),
                          PrivacyLedger(job.state_dir / "privacy.json"), site.name,
                          round_progress(rnd, int(options.get("num-rounds", 0))),
                          dp_seeded=bool(fixed.get("simulation")))
    if cfg.train.keep_norm_local:
        save_local_norms(job.model, _norms_file(job.state_dir, options))
    state = job.model.state_dict()
    if fault is not None:
        state = inject_fault(fault, state, start, float(fixed.get("max-update-ratio", 0.0)))
    arrays = reply_arrays(state, job.received, wire)
    if fault == "shape":
        arrays = misshape(arrays)
    if fault == "inflate":
        metrics["num-examples"] = INFLATED_EXAMPLES
    return metrics, arrays


def _evaluate(job: Job, fixed: dict[str, Any]) -> Message:
    content = RecordDict({METRICS: _metrics(_evaluation(job, fixed), EVALUATE_METRICS),
                          SITE: ConfigRecord({"name": job.site.name})})
    return Message(content=content, reply_to=job.msg)


def _evaluation(job: Job, fixed: dict[str, Any]) -> dict[str, Any]:
    """The received model's metrics on this site's validation split."""
    if fixed.get("faults", {}).get(job.site.name) == "dropout":
        inject_fault("dropout", {})
    return local_evaluate(job.model, job.site.val, job.site.classes, job.cfg, job.device)


def _wire(options: ConfigRecord) -> str:
    wire = str(options.get("wire", "float32"))
    if wire not in WIRE_DTYPES:
        raise IncompatibleFederation(f"the centre asks for the wire dtype {wire!r}; this site "
                                     f"knows {', '.join(WIRE_DTYPES)}")
    return wire


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
           ) -> Job:
    node = dict(context.node_config)
    theirs, ours = str(msg.content["config"].get(VERSION_KEY, "")), package_version()
    if theirs and theirs != ours:  # a message without it comes from a test, not a centre
        raise IncompatibleFederation(f"the centre runs EGCMF-FL {theirs} and this site {ours}: "
                                     f"install version {theirs} at this site")
    cfg = from_dict(yaml.safe_load(str(msg.content["config"]["egcmf-config"])), "server config")
    cfg = _site_privacy(cfg, node)
    site = resolve_site(node, defaults)
    if tuple(cfg.data.classes) != site.classes:
        raise IncompatibleFederation(f"site {site.name}: classes {list(site.classes)} differ "
                                     f"from the federation's {list(cfg.data.classes)}")
    device = pick_device(str(node.get("device", defaults.get("device", "auto"))))
    torch.set_num_threads(int(defaults.get("threads", torch.get_num_threads())))
    try:
        model, received = networks.load(cfg.model, site.classes, msg.content["arrays"], device)
    except ValueError as exc:  # another version of the network
        raise IncompatibleFederation(f"site {site.name}: {exc}") from exc
    state_dir = _state_dir(context, defaults) / site.name
    if cfg.train.keep_norm_local:
        restore_local_norms(model, _norms_file(state_dir, msg.content["config"]))
    return Job(msg, cfg, site, model, received, device, state_dir)


app = make_client_app()
