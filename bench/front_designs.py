"""What a guard in front of the SuperLink costs per request: a filter on a second socket of the
same server (the design fl-server ships) against a separate TLS proxy, and against no guard.

    python bench/front_designs.py --certs CERTS [--big 60] [--small 600]

A stand-in for Flower's Fleet API (uvicorn, TLS, the same certificates) answers POSTs; a
client with keep-alive sends 5 MiB bodies (Flower's object chunk) and small ones (a heartbeat,
a small array), as a SuperNode does. Prints one JSON line per design: seconds per request.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import ssl
import time
from pathlib import Path

import httpx
import uvicorn

from fl_common.procs import free_port, port_open
from fl_server.front import FleetOnly

PATH = "/v1/fleet/push-object"


async def fleet(scope, receive, send):
    """Reads the whole body, answers a few bytes, like a Fleet push."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"stored"})


def proxy_app(backend: str, ca: str):
    """A streaming TLS-to-TLS proxy for POST /v1/fleet/* (uvicorn + httpx), keep-alive."""
    client = httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca), timeout=60)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return

        async def body():
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
                yield message.get("body", b"")

        request = client.build_request("POST", backend + scope["path"], content=body())
        response = await client.send(request, stream=True)
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": []})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        await response.aclose()
    return app


def serve(design: str, port: int, certs: str, backend_port: int) -> None:
    tls = {"ssl_certfile": f"{certs}/server.crt", "ssl_keyfile": f"{certs}/server.key",
           "log_level": "warning", "access_log": False}
    if design == "proxy":
        app = proxy_app(f"https://127.0.0.1:{backend_port}", f"{certs}/ca.crt")
        uvicorn.run(app, host="127.0.0.1", port=port, **tls)
    elif design == "filter":  # the public socket is filtered, the internal one is not
        from fl_server.superlink import bind

        sockets = [bind("127.0.0.1", backend_port), bind("127.0.0.1", port)]
        uvicorn.Server(uvicorn.Config(FleetOnly(fleet, backend_port), **tls)).run(sockets)
    else:
        uvicorn.run(fleet, host="127.0.0.1", port=port, **tls)


def measure(design: str, certs: str, big: int, small: int) -> dict:
    port, backend_port = free_port(), free_port()
    procs = [multiprocessing.Process(target=serve, args=(design, port, certs, backend_port))]
    if design == "proxy":
        procs.append(multiprocessing.Process(target=serve,
                                             args=("none", backend_port, certs, 0)))
    for p in procs:
        p.start()
    while not (port_open("127.0.0.1", port) and (design != "proxy" or
                                                  port_open("127.0.0.1", backend_port))):
        time.sleep(0.1)
    result = {"design": design}
    with httpx.Client(verify=ssl.create_default_context(cafile=f"{certs}/ca.crt"),
                      timeout=60) as client:
        for name, size, count in (("5MiB", 5 * 2**20, big), ("1KiB", 1024, small)):
            body = os.urandom(size)
            client.post(f"https://127.0.0.1:{port}{PATH}", content=body)  # warm
            start = time.perf_counter()
            for _ in range(count):
                assert client.post(f"https://127.0.0.1:{port}{PATH}", content=body).is_success
            result[f"ms_per_{name}_request"] = round(1e3 * (time.perf_counter() - start)
                                                     / count, 3)
    for p in procs:
        p.terminate()
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=Path, required=True, help="made by fl-server certs")
    parser.add_argument("--big", type=int, default=60, help="5 MiB requests per design")
    parser.add_argument("--small", type=int, default=600, help="1 KiB requests per design")
    args = parser.parse_args()
    for design in ("none", "filter", "proxy", "none", "filter", "proxy"):  # twice, interleaved
        print(json.dumps(measure(design, str(args.certs.resolve()), args.big, args.small)),
              flush=True)


if __name__ == "__main__":
    main()
