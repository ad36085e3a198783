"""The site's local channel: only the holder of fl-client's secret can take the node's tasks."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from fl_client.runner import ACQUIRE
from fl_common.procs import flower_env, flower_executable, free_port, port_open


def _client(port: int, secret: bytes | None) -> RuntimeHttpClient:
    interceptors = [] if secret is None else [SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods=frozenset({ACQUIRE}))]
    return RuntimeHttpClient.from_server_address(f"127.0.0.1:{port}", insecure=True,
                                                 root_certificates=None,
                                                 interceptors=interceptors)


def test_another_local_process_cannot_take_the_sites_tasks(tmp_path: Path) -> None:
    """fl-client starts the SuperNode with --isolation process and a fresh secret (mode 0600 in
    the site's 0700 state folder); its Runtime API gives tasks only to requests signed with it."""
    secret_file, port = tmp_path / "secret", free_port()
    secret_file.write_bytes(secrets.token_bytes(32))
    node = subprocess.Popen(
        [flower_executable("flower-supernode"), "--insecure", "--superlink",
         f"127.0.0.1:{free_port()}", "--isolation", "process", "--superexec-auth-secret-file",
         str(secret_file), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=flower_env())
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert node.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.2)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        for intruder in (None, secrets.token_bytes(32)):  # no secret, a guessed one
            with _client(port, intruder) as client, pytest.raises(httpx.HTTPStatusError) as err:
                client.AcquireTask(request)
            assert err.value.response.status_code in (401, 403)
        with _client(port, secret_file.read_bytes()) as client:
            assert not client.AcquireTask(request).HasField("task")  # allowed; nothing to do
    finally:
        node.terminate()
        node.wait(timeout=30)
