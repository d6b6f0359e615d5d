"""A local HTTP server that stands in for a partner's postback endpoint, for tests and the demo.

It records every request exactly as received and answers what it is told to: a fixed status,
a delay, a Retry-After, or a script of answers per path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from workers.dev.server import LocalServer


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    raw_target: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 0  # what the receiver answered


@dataclass
class Answer:
    status: int = 200
    body: str = '{"ok":true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Responder = Callable[[ReceivedRequest, int], Answer]
"""Given a request and how many requests its path has had before it, the answer to give."""


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a worker opening hundreds of connections at
    # once (gevent, concurrency 256) would see connect timeouts that a partner would not cause.
    request_queue_size = 1024


class PostbackReceiver(LocalServer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[ReceivedRequest] = []
        self.counts: Counter[str] = Counter()
        self.responder: Responder = lambda _req, _n: Answer()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                split = urlsplit(self.path)
                request = ReceivedRequest(
                    method=self.command,
                    path=split.path,
                    query=parse_qsl(split.query, keep_blank_values=True),
                    raw_target=self.path,
                    headers={k: v for k, v in self.headers.items()},
                    body=body,
                    at=time.time(),
                )
                with receiver._lock:
                    seen = receiver.counts[split.path]
                    receiver.counts[split.path] += 1
                answer = receiver.responder(request, seen)
                if answer.delay:
                    time.sleep(answer.delay)
                with receiver._lock:
                    receiver.requests.append(replace(request, status=answer.status))
                payload = answer.body.encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = _Server((host, port), Handler)

    def received(self, path: str | None = None, ok_only: bool = False) -> list[ReceivedRequest]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (path is None or r.path == path) and (not ok_only or 200 <= r.status < 300)
            ]

    def wait_for(
        self, count: int, timeout: float = 30.0, path: str | None = None
    ) -> list[ReceivedRequest]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received(path)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        return self.received(path)
