"""Experiments on Flower's simulation engine: the federated run and its FLamby-style baselines.

``federated`` runs the project's own ServerApp and ClientApp (the ones a real federation
deploys) on Flower's Ray-backed simulation engine. ``centralized`` trains one model on the pooled
training data of all sites, ``local`` one model per site on its data alone; both for the same
total number of epochs, both evaluated on every site's validation split with the same code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from egcmf_model.config import Config, to_yaml
from egcmf_model.data.source import DataSource, RoiRecord
from egcmf_model.data.summary import site_partition
from fl_server.settings import DEFAULTS

from .stopping import signals_to, stop_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimSettings:
    out: Path
    clients: int = 5
    rounds: int = DEFAULTS.num_rounds
    partition: str = "institution"
    alpha: float = 0.5
    strategy: str = DEFAULTS.strategy
    seed: int = 0
    client_gpus: float = 0.0  # GPU fraction per virtual client when a GPU exists
    min_sites: int = DEFAULTS.min_sites  # fewest valid updates a round aggregates
    fault: str = ""  # KIND:COUNT, fault injection
    budget: str = "epochs"  # what the centralized baseline holds equal: epochs, steps, examples
    resume: bool = False  # continue the run in ``out`` after its last checkpoint
    keep_checkpoints: int = DEFAULTS.keep_checkpoints  # round checkpoints kept, the newest
    server_options: tuple[tuple[str, Any], ...] = ()  # run-config entries of SERVER_FLAGS
    compare_dir: Path | None = None  # the --compare run this one is part of (no resuming it)


def virtual_sites(source: DataSource, s: SimSettings) -> dict[str, dict[str, list[RoiRecord]]]:
    """Site name -> its ``train`` and ``val`` ROIs. A site left without validation ROIs by the
    partition lends its last training ROI to validation (logged)."""
    sites = {}
    for name, records in site_partition(source, s.partition, s.clients, s.seed, s.alpha).items():
        train = [r for r in records if r.split == "train"]
        val = [r for r in records if r.split != "train"]
        if not val and len(train) > 1:
            val = [train.pop()]
            log.info("site %s has no validation ROI; using %s", name, val[0].roi_id)
        if not train or not val:
            raise ValueError(f"site {name} needs at least one training and one validation ROI; "
                             "use fewer --clients or more data")
        sites[name] = {"train": train, "val": val}
    return sites


def write_partitions(path: Path, classes: tuple[str, ...],
                     sites: dict[str, dict[str, list[RoiRecord]]]) -> Path:
    """The file each virtual client reads its own ROI list from (local paths, never sent)."""
    def plain(r: RoiRecord) -> dict[str, Any]:
        return {"roi_id": r.roi_id, "site": r.site, "split": r.split, "he": str(r.he),
                "mask": str(r.mask), "ck56": None if r.ck56 is None else str(r.ck56),
                "bcss_codes": r.bcss_codes}

    parts = [{"site": name, **{k: [plain(r) for r in v] for k, v in split.items()}}
             for name, split in sites.items()]
    path.write_text(json.dumps({"classes": list(classes), "partitions": parts}, indent=1))
    return path


def site_caps(sites: dict[str, dict[str, list[RoiRecord]]], classes: tuple[str, ...],
              cfg: Config) -> dict[str, dict[str, int]]:
    """What the centre knows of each virtual site: the tiles of its training and validation
    ROIs, the most its replies may claim as ``num-examples``."""
    from egcmf_model.data.dataset import RoiDataset

    with _quiet("egcmf_model.data.dataset"):  # the site names what it skips (sites.log)
        return {name: {stage: len(RoiDataset(split[key], classes, cfg.model.in_size))
                       for stage, key in (("train", "train"), ("evaluate", "val"))}
                for name, split in sites.items()}


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The logger ``name`` says only errors while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def faulty_sites(spec: str, names: list[str], seed: int) -> dict[str, str]:
    """``KIND:COUNT`` -> {site: kind} for COUNT sites drawn with the seed."""
    if not spec:
        return {}
    from fl_client.faults import FAULTS

    kind, _, count = spec.partition(":")
    if kind not in FAULTS or not count.isdigit() or not 0 < int(count) < len(names):
        raise ValueError(f"--fault {spec!r}: use KIND:COUNT with KIND in {', '.join(FAULTS)} "
                         f"and 0 < COUNT < {len(names)} sites")
    chosen = np.random.default_rng(seed).choice(len(names), int(count), replace=False)
    return {names[i]: kind for i in sorted(chosen)}


def _quiet_flower() -> None:
    """Flower logs through its own handler; keep its per-round chatter out of our progress."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    if logging.getLogger("sim").getEffectiveLevel() > logging.DEBUG:
        flwr_log.setLevel(logging.WARNING)
        # We use run_simulation on purpose (one process, seeded, no app bundle to build).
        flwr_log.addFilter(lambda record: "run_simulation" not in record.getMessage())


SITE_LOG = "sites.log"  # what the virtual sites log: warnings and errors, with tracebacks
_ENTRY = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:WARNING|ERROR|CRITICAL) '
                    r'site ("(?:[^"\\]|\\.)*"): (.*)$')  # an entry's first line (SiteLogFormat)


@contextlib.contextmanager
def _echo_site_log(path: Path, every: float = 0.5) -> Iterator[None]:
    """Print each distinct message the virtual sites log (an ROI skipped, a failure) as they
    log it, once however many rounds repeat it; tracebacks stay in the file. A resumed run
    appends to the file and prints only what is new."""
    offset = path.stat().st_size if path.exists() else 0
    seen: set[tuple[str, str]] = set()
    stop = threading.Event()

    def echo() -> None:
        nonlocal offset
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return
        complete = data[:data.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.decode("utf-8", "replace").split("\n"):  # entries end in \n alone
            if not (match := _ENTRY.match(line)):
                continue  # a further line of an entry: a traceback stays in the file
            site, message = json.loads(match[1]), match[2]
            message = _printable(message.removeprefix(f"site {site}: "))
            if (site, message) not in seen:
                seen.add((site, message))
                log.warning("site %s: %s", site, message)

    def follow() -> None:
        while not stop.wait(every):
            echo()

    thread = threading.Thread(target=follow, name="site-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        echo()
        if seen:
            log.warning("the sites' warnings and errors, with details: %s", path)


def _printable(text: str) -> str:
    """``text`` with its control characters (a carriage return, a form feed…) escaped, so that
    no name can rewrite the console's line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _stopped_by_interrupt(out: Path, compare_dir: Path | None
                          ) -> contextlib.AbstractContextManager[None]:
    """Ctrl-C (or SIGTERM, or the terminal closing) stops the simulation at once, with one
    line that says how to go on. Flower's simulation cannot be cancelled: its threads would
    keep the process alive, waiting for workers that the interrupt ended, and Ray cannot be
    shut down under them. So the process ends at once, and the Ray processes it started are
    ended a moment later, once it is gone. What is saved stays (checkpoints and metrics are
    written whole), and ``--resume`` continues after the last finished round; a run stopped
    after its last round, its summary written, gets its reports written before it ends."""

    def stop(signum: int, _frame: Any) -> None:
        logging.disable(logging.CRITICAL)  # the workers' ends are not the user's errors
        summary = out / "summary.json"
        if compare_dir is None and summary.exists():  # complete: Flower's teardown was left
            from .report import write_reports

            write_reports(out, json.loads(summary.read_text()), "federated")
            line = f"sim/run.py: stopped after the run's last round; the run is complete: {out}"
        else:
            line = stop_line(compare_dir or out, resumable=compare_dir is None)
        with contextlib.suppress(OSError):  # nobody may read it any more (a closed pipe)
            print(line, file=sys.stderr, flush=True)
        started = _descendants(os.getpid())
        if started:
            import subprocess

            pids = " ".join(map(str, started))
            subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {pids} 2>/dev/null"],
                             start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        os._exit(128 + signum)

    return signals_to(stop)


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started and theirs, from ``/proc`` (none where there is no
    ``/proc``: Ray's agents then end by themselves within a minute)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@contextlib.contextmanager
def _ray_with_warm_workers(init_args: dict[str, Any]) -> Iterator[None]:
    """Ray as Flower's simulation would start it (the driver's ``sys.path`` for the workers),
    whose workers import the site's code as they start (:mod:`fl_client.warm`); Flower uses
    a Ray that is already running, and stops it when the simulation ends."""
    import ray

    if ray.is_initialized():  # the caller's own Ray: Flower uses it as it is
        yield
        return
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = path
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": path},
                          "worker_process_setup_hook": "fl_client.warm.prepare_worker"},
             **init_args)
    try:
        yield
    finally:
        if ray.is_initialized():  # Flower stops it, unless the simulation never began
            ray.shutdown()


def run_federated(cfg: Config, source: DataSource, s: SimSettings) -> dict[str, Any]:
    """The federation on Flower's simulation engine; writes the run folder, returns the summary."""
    from flwr.simulation import run_simulation

    from fl_client.client_app import make_client_app
    from fl_server.server_app import make_server_app

    sites = virtual_sites(source, s)
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "config.yaml").write_text(to_yaml(cfg))
    partitions = write_partitions(s.out / "partitions.json", source.classes, sites)
    caps = site_caps(sites, source.classes, cfg)
    server = make_server_app({"run-dir": str(s.out), "num-rounds": s.rounds,
                              "min-sites": min(s.min_sites, len(sites)), "strategy": s.strategy,
                              "config-file": str(s.out / "config.yaml"),
                              "sites": len(sites), "simulation": True, "resume": s.resume,
                              "site-caps": json.dumps(caps), **dict(s.server_options)})
    faults = faulty_sites(s.fault, sorted(sites), s.seed)
    if faults:
        log.info("fault injection: %s", ", ".join(f"{k} -> {v}" for k, v in faults.items()))
    client = make_client_app({"partitions": str(partitions), "threads": 1, "faults": faults,
                              "simulation": True, "max-update-ratio": dict(
                                  s.server_options).get("max-update-ratio", 0.0),
                              "state-dir": str(s.out / "site_state"),
                              "site-log": str(s.out / SITE_LOG),
                              "device": "cuda" if s.client_gpus > 0 else "cpu"})
    init_args = {"num_cpus": os.cpu_count() or 1, "log_to_driver": False,
                 "logging_level": "ERROR", "include_dashboard": False}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": s.client_gpus},
               "init_args": init_args}
    _quiet_flower()
    with (_stopped_by_interrupt(s.out, s.compare_dir),  # stopped while Ray starts, too
          _ray_with_warm_workers(init_args),
          _stopped_by_interrupt(s.out, s.compare_dir),  # again: Ray set its own SIGTERM's
          _echo_site_log(s.out / SITE_LOG)):
        run_simulation(server_app=server, client_app=client, num_supernodes=len(sites),
                       backend_config=backend)
    summary_path = s.out / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without a summary; see {s.out}/events.jsonl "
                           "and the log above")
    return json.loads(summary_path.read_text())
