"""What the public address serves: the Fleet API a SuperNode needs, and nothing else.

Flower 1.42 serves its Control API (register keys, submit, list and stop runs; no caller
authentication in the open-source SuperLink), Fleet API and Runtime API as routes of one HTTP
app. Our SuperLink (:mod:`fl_server.superlink`) serves that app on two sockets: the centre's
loopback, with every route, and the public address, where this filter lets through only
``POST /v1/fleet/<operation>`` and answers everything else ``404``. Which socket a connection
came in on is the socket's own local address, not anything the client sends.

One more check here: a SuperNode proves who it is on every Fleet request (Flower's signed
headers bind the request's ``node.node_id`` to the node's key), but the replies it pushes carry
their own ``src_node_id``, which Flower does not compare with the authenticated node. We do: a
push whose messages name another node is refused (403), so that the centre can trust a reply's
source node when it maps it to a site.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from flwr.proto.fleet_pb2 import PushMessagesRequest
from google.protobuf.message import DecodeError

log = logging.getLogger("fl-server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_OPERATIONS = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"})
PUBLIC_ROUTES = frozenset(f"/v1/fleet/{op}" for op in FLEET_OPERATIONS)
PUSH_MESSAGES = "/v1/fleet/push-messages"
MAX_PUSH_BODY = 64 * 1024 * 1024  # a push names messages and object trees, never their content


class FleetOnly:
    """ASGI filter: full access on the internal (loopback) port, the Fleet API elsewhere."""

    def __init__(self, app: ASGIApp, internal_port: int) -> None:
        self.app, self.internal_port = app, internal_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or self._internal(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["method"] != "POST" or scope["path"] not in PUBLIC_ROUTES:
            _refused(scope, "not part of the Fleet API")
            await _respond(send, 404, "Not Found")
            return
        if scope["path"] == PUSH_MESSAGES:
            body = await _read_body(receive, MAX_PUSH_BODY)
            problem = push_problem(body)
            if problem:
                _refused(scope, problem)
                await _respond(send, 403, problem)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _internal(self, scope: Scope) -> bool:
        server = scope.get("server")
        return bool(server) and server[1] == self.internal_port


def push_problem(body: bytes | None) -> str | None:
    """Why a Fleet push-messages body must be refused, or None."""
    if body is None:
        return "request body too large"
    request = PushMessagesRequest()
    try:
        request.ParseFromString(body)
    except DecodeError:
        return "malformed push-messages request"
    node = request.node.node_id
    for message in request.messages_list:
        if message.metadata.src_node_id != node:
            return (f"node {node} pushed a reply in the name of node "
                    f"{message.metadata.src_node_id}")
    return None


def _refused(scope: Scope, why: str) -> None:
    client = scope.get("client") or ("?", 0)
    log.warning("public address: refused %s %s from %s (%s)", scope.get("method"),
                scope.get("path"), client[0], why)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
