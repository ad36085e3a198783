"""The public address's filter, addresses as users write them, and the clear-text rule."""

from __future__ import annotations

import asyncio

import pytest
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.proto.node_pb2 import Node

from fl_common.address import INSECURE_OVERRIDE, Address, check_insecure, parse_address
from fl_server.front import PUBLIC_ROUTES, FleetOnly

INTERNAL, PUBLIC = 40001, 8000


def _call(path: str, method: str = "POST", port: int = PUBLIC, body: bytes = b""
          ) -> tuple[int, bytes | None]:
    """Send one request through the filter; returns (status, body the SuperLink app saw)."""
    seen: dict[str, bytes] = {}

    async def superlink(scope, receive, send):
        message = await receive()
        seen["body"] = message.get("body", b"")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "server": ("0.0.0.0", port),
             "client": ("203.0.113.9", 5555), "headers": []}
    asyncio.run(FleetOnly(superlink, INTERNAL)(scope, receive, send))
    return sent[0]["status"], seen.get("body")


@pytest.mark.parametrize("path", ["/v1/control/register-node", "/v1/control/start-run",
                                  "/v1/control/list-runs", "/v1/control/stop-run",
                                  "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input",
                                  "/health", "/docs", "/openapi.json", "/v1/fleet/../control/x",
                                  "/v1/fleet/register-node/../../control/start-run"])
def test_the_public_address_serves_no_control_or_runtime_route(path: str) -> None:
    assert _call(path) == (404, None)
    assert _call(path, port=INTERNAL)[0] == 200  # the centre's own loopback socket


def test_the_public_address_serves_the_fleet_api_by_post_only() -> None:
    for path in PUBLIC_ROUTES:
        assert _call(path)[0] == 200, path
        assert _call(path, method="GET") == (404, None)


def _push(node: int, src: int) -> bytes:
    message = MessageProto()
    message.metadata.src_node_id = src
    return PushMessagesRequest(node=Node(node_id=node), messages_list=[message]
                               ).SerializeToString()


def test_a_node_cannot_push_a_reply_in_another_nodes_name() -> None:
    assert _call("/v1/fleet/push-messages", body=_push(node=7, src=9)) == (403, None)
    body = _push(node=7, src=7)
    assert _call("/v1/fleet/push-messages", body=body) == (200, body)  # passed on unchanged
    assert _call("/v1/fleet/push-messages", body=b"\xff\xff not protobuf")[0] == 403


@pytest.mark.parametrize(("text", "address"), [
    ("0.0.0.0:8000", Address("0.0.0.0", 8000)), ("[::]:8000", Address("::", 8000)),
    ("[::1]:9", Address("::1", 9)), ("fl.example.org:443", Address("fl.example.org", 443))])
def test_addresses_as_users_write_them(text: str, address: Address) -> None:
    assert parse_address(text, "--address") == address
    assert str(address) == text


@pytest.mark.parametrize("text", ["8000", "::1:8000", "host:", "host:99999", ":8000"])
def test_bad_addresses_say_how_to_write_them(text: str) -> None:
    with pytest.raises(ValueError, match="--address"):
        parse_address(text, "--address")


def test_clear_text_is_refused_beyond_loopback(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(INSECURE_OVERRIDE, raising=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_insecure(Address(host, 8000), "hospital")
    for host in ("0.0.0.0", "::", "10.1.2.3", "fl.example.org"):
        with pytest.raises(ValueError, match=INSECURE_OVERRIDE):
            check_insecure(Address(host, 8000), "hospital")
    monkeypatch.setenv(INSECURE_OVERRIDE, "1")
    check_insecure(Address("0.0.0.0", 8000), "hospital")
    assert INSECURE_OVERRIDE in caplog.text  # and it says why it allowed it
