"""A sandbox AppMetrica Logs API serving the postbacks export from rows a test sets.

Like the real one as the docs describe it: 202 `Wait for result` for the first N polls of a
query, then 200; 429 when more than 3 distinct queries are pending; 401 without the token;
values as strings, as in the official example; gzip when the client accepts it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from schemas.appmetrica import TIME_FORMAT
from workers.dev.server import LocalServer

PATH = "/logs/v1/export/postbacks.json"
MAX_PENDING = 3


def export_row(
    url: str, status: str, when: int, *, device: str, application_id: str
) -> dict[str, str]:
    """One attempt row of AppMetrica's postbacks export, for the postback ``url`` of an install
    on iOS ``device`` at ``when`` (epoch s); every value a string, as AppMetrica's own example
    has them. The click id follows the URL: every attempt of one postback shares it."""
    return {
        "application_id": application_id,
        "click_id": hashlib.md5(url.encode()).hexdigest(),  # noqa: S324 - an id, not security
        "google_aid": "",
        "ios_ifa": device,
        "appmetrica_device_id": "",
        "conversion_datetime": datetime.fromtimestamp(when, UTC).strftime(TIME_FORMAT),
        "conversion_timestamp": str(when),
        "event_name": "install",
        "attempt_timestamp": str(when + 5),
        "cost_model": "cpi",
        "notifying_status": status,
        "postback_url": url,
        "postback_url_parameters": url.partition("?")[2],
        "response_body": "OK" if status == "sent" else "",
        "response_code": "200" if status == "sent" else "504",
    }


@dataclass
class SandboxAppMetrica(LocalServer):
    token: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    polls_before_ready: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)  # as sent: an export is keyed on its query
    client_ports: list[int] = field(default_factory=list)  # one port per kept-alive connection
    raw_body: bytes | None = None  # serve exactly these bytes (malformed-export tests)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._polls: dict[str, int] = {}
        sandbox = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                sandbox.client_ports.append(self.client_address[1])
                status, content_type, body = sandbox.answer(self.path, dict(self.headers.items()))
                gzipped = "gzip" in self.headers.get("Accept-Encoding", "") and status == 200
                if gzipped:
                    body = gzip.compress(body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if gzipped:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def answer(self, target: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        split = urlsplit(target)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        with self._lock:
            self.requests.append(params)
            self.queries.append(split.query)
        refusal = self._refusal(split.path, params, headers)
        if refusal is not None:
            return refusal
        query = split.query
        with self._lock:
            pending = [q for q, n in self._polls.items() if n < self.polls_before_ready]
            if query not in self._polls and len(pending) >= MAX_PENDING:
                return 429, "text/plain", b"Too many exports queued for this application"
            polls = self._polls.get(query, 0)
            self._polls[query] = polls + 1
        if polls < self.polls_before_ready:
            return 202, "text/plain", b"Wait for result"
        if self.raw_body is not None:
            return 200, "application/json", self.raw_body
        return 200, "application/json", json.dumps({"data": self.select(params)}).encode()

    def _refusal(
        self, path: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, str, bytes] | None:
        if path != PATH:
            return 404, "text/plain", b"Not found"
        if headers.get("Authorization") != f"OAuth {self.token}":
            return 401, "text/plain", b"Unauthorized"
        missing = [p for p in ("application_id", "date_since", "date_until", "fields")
                   if not params.get(p)]  # fmt: skip
        if missing:
            return 400, "text/plain", f"missing {', '.join(missing)}".encode()
        return None

    def select(self, params: dict[str, str]) -> list[dict[str, str]]:
        since = _epoch(params["date_since"])
        until = _epoch(params["date_until"])
        fields = params["fields"].split(",")
        out = []
        for row in self.rows:
            if str(row.get("application_id")) != params["application_id"]:
                continue
            try:
                when = int(str(row.get("conversion_timestamp", "0")) or 0)
            except ValueError:
                when = since  # a malformed row is served as is: the client must cope
            if since <= when <= until:
                out.append({f: str(row.get(f, "")) for f in fields})
        return out


def _epoch(value: str) -> int:
    return int(datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp())
