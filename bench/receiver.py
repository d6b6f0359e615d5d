"""A fast partner endpoint for benchmarks: asyncio, HTTP/1.1 keep-alive, counts every request.

Run as its own process (``python bench/receiver.py --delay 0.1``) so that neither the
benchmark's producer nor its GIL sits between a worker and the "partner". It prints
``port=<n>`` once it listens. Every request to a path not starting with ``/__`` is answered
``200 {"ok":true}`` (after ``--delay`` seconds, without holding a thread) and its arrival time
is kept; with ``--targets`` its request target (path + query) is kept as well.

Control endpoints (for the benchmark process):
  GET /__stats            {"count": n, "first": t, "last": t}
  GET /__dump             {"times": [...], "targets": [...]}  (targets only with --targets)
  GET /__reset            forget everything received so far
  GET /__delay?s=0.1      change the answer delay
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from urllib.parse import parse_qs, urlsplit

_OK_BODY = b'{"ok":true}'
_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_OK_BODY)).encode()
    + b"\r\nConnection: keep-alive\r\n\r\n"
    + _OK_BODY
)


class State:
    def __init__(self, delay: float, keep_targets: bool) -> None:
        self.delay = delay
        self.keep_targets = keep_targets
        self.times: array[float] = array("d")
        self.targets: list[str] = []

    def control(self, target: str) -> bytes:
        split = urlsplit(target)
        if split.path == "/__stats":
            body: object = {
                "count": len(self.times),
                "first": self.times[0] if self.times else None,
                "last": self.times[-1] if self.times else None,
            }
        elif split.path == "/__dump":
            body = {"times": self.times.tolist(), "targets": self.targets}
        elif split.path == "/__reset":
            self.times = array("d")
            self.targets = []
            body = {"reset": True}
        elif split.path == "/__delay":
            self.delay = float(parse_qs(split.query)["s"][0])
            body = {"delay": self.delay}
        else:
            body = {"error": "unknown control path"}
        payload = json.dumps(body).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )


class HttpProtocol(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self._answer(head.split(b" ", 2)[1].decode("latin-1"))

    def _answer(self, target: str) -> None:
        assert self.transport is not None
        state = self.state
        if target.startswith("/__"):
            self.transport.write(state.control(target))
            return
        state.times.append(time.time())
        if state.keep_targets:
            state.targets.append(target)
        if state.delay > 0:
            asyncio.get_running_loop().call_later(state.delay, self._send_ok)
        else:
            self.transport.write(_OK)

    def _send_ok(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_OK)


async def serve(port: int, state: State) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(state), "127.0.0.1", port, backlog=1024)
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--targets", action="store_true", help="keep each request target")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, State(args.delay, args.targets)))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
