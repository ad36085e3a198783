"""The site's local channel: only the holder of fl-client's secret can take the node's tasks,
and the runner takes tasks only from the node that fl-client started."""

from __future__ import annotations

import contextlib
import secrets
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from fl_client.runner import ACQUIRE
from fl_common.localtls import write_local_identity
from fl_common.procs import flower_env, flower_executable, free_port, port_open


def _client(port: int, secret: bytes | None, verify: bytes | bool | None
            ) -> RuntimeHttpClient:
    """A Runtime API client: plain HTTP (``verify`` None), TLS that trusts ``verify`` (the
    certificate's bytes) or any certificate (False)."""
    interceptors = [] if secret is None else [SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods=frozenset({ACQUIRE}))]
    if verify is False:
        return RuntimeHttpClient(f"https://127.0.0.1:{port}", interceptors=interceptors,
                                 verify=False)
    return RuntimeHttpClient.from_server_address(f"127.0.0.1:{port}", insecure=verify is None,
                                                 root_certificates=verify,
                                                 interceptors=interceptors)


def test_another_local_process_cannot_take_the_sites_tasks(tmp_path: Path) -> None:
    """fl-client starts the SuperNode with --isolation process, a fresh secret and a fresh TLS
    identity (mode 0600 in the site's 0700 state folder), as here; its Runtime API gives tasks
    only to requests signed with the secret, over TLS or not at all."""
    secret_file, port = tmp_path / "secret", free_port()
    secret_file.write_bytes(secrets.token_bytes(32))
    cert, key = write_local_identity(tmp_path)
    node = subprocess.Popen(
        [flower_executable("flower-supernode"), "--insecure", "--superlink",
         f"127.0.0.1:{free_port()}", "--isolation", "process", "--superexec-auth-secret-file",
         str(secret_file), "--host", "127.0.0.1", "--port", str(port), "--ssl-certfile",
         str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(cert)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=flower_env())
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert node.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.2)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        for intruder in (None, secrets.token_bytes(32)):  # no secret, a guessed one
            with _client(port, intruder, verify=False) as client, \
                    pytest.raises(httpx.HTTPStatusError) as err:
                client.AcquireTask(request)
            assert err.value.response.status_code in (401, 403)
        with _client(port, None, verify=None) as client, pytest.raises(httpx.HTTPError):
            client.AcquireTask(request)  # in plain HTTP: no answer at all
        with _client(port, secret_file.read_bytes(), verify=cert.read_bytes()) as client:
            assert not client.AcquireTask(request).HasField("task")  # allowed; nothing to do
    finally:
        node.terminate()
        node.wait(timeout=30)


class _Squatter(threading.Thread):
    """A process that took the node's port first: records every byte a client sends it, and
    with ``tls`` completes the handshake with a certificate of its own."""

    def __init__(self, port: int, identity: tuple[Path, Path] | None) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.context = None
        if identity is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*identity)
        self.received, self.decrypted = b"", b""
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                if self.context is None:
                    with contextlib.suppress(OSError):
                        while chunk := conn.recv(65536):
                            self.received += chunk
                    continue
                with contextlib.suppress(OSError), \
                        self.context.wrap_socket(conn, server_side=True) as tls:
                    while chunk := tls.recv(65536):
                        self.decrypted += chunk
        self.sock.close()


@pytest.mark.parametrize("tls", [False, True])
def test_a_process_on_the_nodes_port_gets_no_request_from_the_runner(
        tmp_path: Path, tls: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Another local process that holds the port fl-client chose for its SuperNode (plain, or
    TLS with a certificate of its own) cannot pass for it: the runner trusts only the
    certificate fl-client made, so it sends no request, signed or not, and takes no task."""
    from fl_client.runner import Runner, RunnerOptions

    genuine, _ = write_local_identity(private := tmp_path / "site")
    port = free_port()
    squatter = _Squatter(port, write_local_identity(tmp_path) if tls else None)
    squatter.start()
    (private / "secret").write_bytes(secrets.token_bytes(32))
    runner = Runner(RunnerOptions(f"127.0.0.1:{port}", genuine, private / "secret",
                                  private / "status.json", {"site": "plagh"}, None))
    with caplog.at_level("ERROR", logger="fl-client"):
        assert runner._acquire() is None
        assert runner._acquire() is None
    squatter.stop.set()
    squatter.join(timeout=30)
    assert squatter.received[:1] in (b"", b"\x16")  # at most a TLS handshake, no request
    assert b"HTTP/" not in squatter.received
    assert squatter.decrypted == b""
    if tls:
        assert caplog.text.count("is not this site's node") == 1  # said once, not per poll


def test_fl_client_stops_in_words_when_another_process_holds_its_nodes_port(
        tmp_path: Path) -> None:
    """The node cannot bind the port fl-client chose (another process took it first): one line
    that says so and what to do, not restarts ending in 'not registered at the server'."""
    from fl_client.node import Session
    from fl_client.options import JoinError

    log_file = tmp_path / "supernode.log"
    log_file.write_text("ERROR:    [Errno 98] error while attempting to bind on address "
                        "('127.0.0.1', 5555): address already in use\n")
    session = SimpleNamespace(log_file=log_file, seen=0, server="fl.example.org:8000",
                              opts=SimpleNamespace(ca=None), port=5555)
    with pytest.raises(JoinError, match=r"127.0.0.1:5555, the port between this site's node "
                                        r"and its runner, is held by another process") as err:
        Session._read_node_log(session)
    assert err.value.code == 6


def test_fl_client_waiting_for_the_centre_says_so_once_not_at_every_try(
        caplog: pytest.LogCaptureFixture) -> None:
    """A site started before the centre retries quietly (one line, then one every 30 s) and
    stops after --max-wait with what to check."""
    from fl_client.node import wait_for_server
    from fl_client.options import JoinError
    from fl_common.address import parse_address

    server = parse_address(f"127.0.0.1:{free_port()}", "--server")
    with caplog.at_level("INFO", logger="fl-client"), \
            pytest.raises(JoinError, match="is fl-server start running") as err:
        wait_for_server(server, None, max_wait=3.0)
    assert err.value.code == 3
    assert caplog.text.count("not reachable yet") == 1
