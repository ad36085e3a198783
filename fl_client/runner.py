"""The site's runner: one long-lived process that answers every task with the installed ClientApp.

``fl-client`` starts Flower's SuperNode with ``--isolation process`` (it then launches nothing
itself) and this runner beside it. The runner takes the SuperNode's tasks from its local Runtime
API (``AcquireTask``, authenticated with a secret that only ``fl-client`` and the runner hold),
and for each task does what Flower's ``flwr-clientapp`` does in a fresh process: pull the
message, run the app, push the reply and the task's result. Here torch is imported and the
ClientApp built once for all tasks, and the app is always the installed
``fl_client.client_app:app``: nothing in the bundle the centre sends is ever imported.

Before it answers any task of a run, the runner checks the consortium's signature over the run
(:mod:`fl_common.appsign`) against the site's ``ca.crt``; an unsigned or foreign-signed run gets
an error reply to every task, and the site's log says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Context, Error, Message, MessageType
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
from google.protobuf.message import DecodeError

from fl_common.appsign import AppRejected, load_ca, verify_run
from fl_common.files import atomic_write

log = logging.getLogger("fl-client")
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
NOT_TRUSTED = "CERTIFICATE_VERIFY_FAILED"  # what a TLS peer we do not trust makes us say


@dataclass(frozen=True)
class RunnerOptions:
    runtime: str  # HOST:PORT of the SuperNode's Runtime API (loopback)
    runtime_cert: Path | None  # the certificate it serves (fl_common.localtls); None: plain
    secret_file: Path  # shared with the SuperNode (--superexec-auth-secret-file)
    status_file: Path  # what fl-client reads: run, node, round, whether the last round is done
    node_config: dict[str, Any]  # site, data, device, state-dir, DP settings
    ca: Path | None  # the consortium's ca.crt; None: --insecure, signatures not checked
    poll: float = 0.1  # seconds between task queries when idle (a local request)


class Runner:
    def __init__(self, opts: RunnerOptions) -> None:
        from fl_client.client_app import app  # the installed app, imported once

        self.opts, self.app = opts, app
        self.ca = None if opts.ca is None else load_ca(opts.ca.read_bytes())
        self.verdicts: dict[tuple[int, str], str | None] = {}  # refusal reason, None if signed
        self.status: dict[str, Any] = {}
        self.logged: set[str] = set()
        self.trusted = None if opts.runtime_cert is None else opts.runtime_cert.read_bytes()
        self.acquire = self._client(
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=opts.secret_file.read_bytes(),
                                         protected_methods=frozenset({ACQUIRE})))

    def _client(self, *interceptors: Any) -> RuntimeHttpClient:
        """A client of the SuperNode's Runtime API that trusts only the certificate fl-client
        made for it: another process on the port cannot pass for the SuperNode."""
        return RuntimeHttpClient.from_server_address(
            self.opts.runtime, insecure=self.trusted is None, root_certificates=self.trusted,
            interceptors=list(interceptors))

    def serve_forever(self) -> None:
        while True:
            token = self._acquire()
            if token:
                self.run_task(token)
            else:
                time.sleep(self.opts.poll)

    def _acquire(self) -> str | None:
        try:
            res = self.acquire.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except httpx.HTTPError as exc:
            if NOT_TRUSTED in str(exc):  # not our SuperNode: ask it nothing
                self._once(f"the process at {self.opts.runtime} is not this site's node (its "
                           "TLS certificate is not the one fl-client made); not asking it for "
                           "work")
            else:  # the SuperNode is (re)starting
                log.debug("no task from the SuperNode yet: %s", exc)
            return None
        except (ValueError, DecodeError) as exc:  # an answer that is not the Runtime API's
            self._once(f"the node at {self.opts.runtime} answered something unreadable "
                       f"({exc}); ignoring it")
            return None
        return res.token if res.HasField("task") and res.token else None

    def _once(self, problem: str) -> None:
        """Log ``problem`` the first time only (the runner asks ten times a second)."""
        if problem not in self.logged:
            self.logged.add(problem)
            log.error("%s", problem)

    def run_task(self, token: str) -> None:
        """One task: pull its message, check the run, answer, push reply and result."""
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        heartbeat.start()
        context, sub_status, details = None, SubStatus.FAILED, "task failed"
        began = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            refusal = self._verdict(run, fab.content)
            if refusal:
                reply, details = Message(Error(ErrorCode.INVALID_FAB, refusal),
                                         reply_to=message), refusal
            else:
                context.node_config = dict(self.opts.node_config)
                reply = self._answer(message, context)
                sub_status, details = SubStatus.COMPLETED, ""
            push_message(client, reply, context)
            self._record(run, context, message, reply)
            log.info("round %s: %s %s in %.1fs", self.status.get("round", "?"), _task(message),
                     "refused" if refusal else "failed" if reply.has_error() else "answered",
                     time.perf_counter() - began)
        except Exception as exc:
            log.warning("a task could not be completed: %s", exc)
        finally:
            push_task_output(client, context, sub_status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _verdict(self, run: Run, fab_content: bytes) -> str | None:
        """None if the consortium signed this run; otherwise why it is refused (once per run)."""
        key = (run.run_id, run.fab_hash)
        if key not in self.verdicts:
            if self.ca is None:
                log.warning("INSECURE: run %d is not checked for the consortium's signature",
                            run.run_id)
                self.verdicts[key] = None
            else:
                try:
                    signer = verify_run(self.ca, fab_content, run.fab_hash, run.override_config)
                    log.info("run %d: signed by %s; answering its tasks", run.run_id,
                             signer.subject.rfc4514_string())
                    self.verdicts[key] = None
                except AppRejected as exc:
                    reason = (f"site refuses run {run.run_id}: {exc}; only apps signed by the "
                              f"consortium (checked with {self.opts.ca}) run here")
                    log.error("%s", reason)
                    self.verdicts[key] = reason
        return self.verdicts[key]

    def _answer(self, message: Message, context: Context) -> Message:
        try:
            return self.app(message=message, context=context)
        except Exception as exc:
            log.exception("the ClientApp failed on a %s message", message.metadata.message_type)
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 f"the site's ClientApp failed ({type(exc).__name__}); the "
                                 "details are in the site's log"), reply_to=message)

    def _record(self, run: Run, context: Context, message: Message, reply: Message) -> None:
        """The status fl-client follows: which run and node, and whether this site has answered
        the evaluation of the run's last round."""
        config = message.content["config"] if message.has_content() else {}
        rnd = int(config.get("server-round", 0)) if "server-round" in config else 0
        last = int(context.run_config.get("num-rounds", 0) or 0)
        final = (message.metadata.message_type == MessageType.EVALUATE and not reply.has_error()
                 and (bool(config.get("final-evaluation")) or (last > 0 and rnd >= last)))
        previous = self.status if self.status.get("run_id") == run.run_id else {}
        self.status = {"run_id": run.run_id, "node_id": context.node_id, "round": rnd,
                       "final": bool(previous.get("final")) or final, "time": time.time()}
        atomic_write(self.opts.status_file, json.dumps(self.status).encode(), private=True)


def _task(message: Message) -> str:
    """What a message asks: ``evaluate``, ``train``, ``evaluate and train``, or the final
    evaluation of the last round's model."""
    kind = message.metadata.message_type
    config = message.content["config"] if message.has_content() and \
        "config" in message.content else {}
    if kind == MessageType.EVALUATE and config.get("final-evaluation"):
        return "final evaluation (the last round's model)"
    return f"evaluate and {kind}" if kind == MessageType.TRAIN and config.get("evaluate") \
        else kind


def _task_heartbeat(client: RuntimeHttpClient):
    """Keep the task alive while the app works; never signals this process (Flower's own
    heartbeat interrupts a ``flwr-clientapp`` whose task is gone; the runner carries on)."""
    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError:
            return True  # the task is gone; its reply will say so
        return True
    return beat


def read_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fl_client.runner",
                                description="the site's task runner (fl-client starts it)")
    p.add_argument("--runtime", required=True)
    p.add_argument("--runtime-cert", type=Path, help="the certificate the SuperNode serves "
                   "(default: a plain connection)")
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--status-file", type=Path, required=True)
    p.add_argument("--node-config", required=True, help="JSON")
    p.add_argument("--ca", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="fl-client: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    Runner(RunnerOptions(args.runtime, args.runtime_cert, args.secret_file, args.status_file,
                         json.loads(args.node_config), args.ca)).serve_forever()


if __name__ == "__main__":
    main()
