"""A sandbox XMP S2S postback v2 endpoint: strict body checks, latest totals per request_id.

Checks what the seed documents: the token, activity_kind, at most 200 records, required fields,
types, lengths, dates, the 90-day active_date rule, the channel enumeration, country form and
numeric(20,6) values. Answers {code, msg, batch_id}. On demand: 400 for chosen request ids,
401, 5xx, slow.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from config.kinds.xmp import XMP_CHANNELS
from workers.dev.server import LocalServer

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_STRINGS = {"channel": 64, "campaign_id": 64, "adset_id": 64, "ad_id": 64, "country": 2,
            "event_name": 64, "event_date": 10, "active_date": 10, "request_id": 128,
            "app_id": 128}  # fmt: skip
_OPTIONAL_STRINGS = {"subsource_id": 128, "timezone": 8}
_METRICS = ("event_count", "event_value", "event_unique_users", "event_revenue_usd")


@dataclass
class SandboxXmp(LocalServer):
    url_path = "/s2s/postback/v2"

    token: str
    extra_channels: tuple[str, ...] = ()
    delay: float = 0.0
    reject_request_ids: set[str] = field(default_factory=set)  # answered 400 when present
    fail_statuses: list[int] = field(default_factory=list)  # next answers' HTTP statuses
    totals: dict[str, dict[str, Any]] = field(default_factory=dict)  # request_id -> record
    requests: list[dict[str, Any]] = field(default_factory=list)  # every body received

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        sandbox = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                status, body = sandbox.answer(self.rfile.read(length))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def answer(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        if self.delay:
            time.sleep(self.delay)
        batch_id = uuid.uuid4().hex
        with self._lock:
            forced = self.fail_statuses.pop(0) if self.fail_statuses else None
        if forced is not None:
            return forced, {"code": forced, "msg": "sandbox: scripted failure", "batch_id": ""}
        try:
            body = json.loads(raw, parse_float=Decimal)
        except ValueError:
            return 400, {"code": 400, "msg": "body is not JSON", "batch_id": batch_id}
        with self._lock:
            self.requests.append(body)
        if not isinstance(body, dict) or body.get("xmp_token") != self.token:
            return 200, {"code": 401, "msg": "unauthorized: bad xmp_token", "batch_id": batch_id}
        problems = self.check(body)
        if problems:
            return 200, {"code": 400, "msg": "; ".join(problems[:5]), "batch_id": batch_id}
        with self._lock:
            for record in body["data"]:
                self.totals[record["request_id"]] = record
        return 200, {"code": 200, "msg": "success", "batch_id": batch_id}

    def check(self, body: dict[str, Any]) -> list[str]:
        problems = []
        if body.get("activity_kind") != "in-app-event-agg":
            problems.append("activity_kind must be in-app-event-agg")
        data = body.get("data")
        if not isinstance(data, list) or not data:
            return [*problems, "data must be a non-empty list"]
        if len(data) > 200:
            problems.append(f"data has {len(data)} records; at most 200")
        for index, record in enumerate(data):
            problems += [f"data[{index}].{p}" for p in self.check_record(record)]
        return problems

    def check_record(self, record: Any) -> list[str]:
        if not isinstance(record, dict):
            return ["must be an object"]
        problems = []
        for name, limit in _STRINGS.items():
            value = record.get(name)
            if not isinstance(value, str):
                problems.append(f"{name}: required string")
            elif len(value) > limit:
                problems.append(f"{name}: longer than {limit}")
        for name, limit in _OPTIONAL_STRINGS.items():
            value = record.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > limit):
                problems.append(f"{name}: a string of at most {limit}")
        if problems:
            return problems
        return self._check_values(record)

    def _check_values(self, record: dict[str, Any]) -> list[str]:
        problems = []
        if record["request_id"] in self.reject_request_ids:
            problems.append(f"request_id {record['request_id']}: rejected by the sandbox")
        if record["channel"] not in (*XMP_CHANNELS, *self.extra_channels):
            problems.append(f"channel: {record['channel']!r} is not an XMP channel")
        if not (re.fullmatch(r"[A-Z]{2}", record["country"]) or record["country"] == " "):
            problems.append("country: two upper-case letters or a single space")
        return problems + _check_dates(record) + _check_metrics(record)


def _check_metrics(record: dict[str, Any]) -> list[str]:
    present = [m for m in _METRICS if m in record]
    if not present:
        return ["one of event_count, event_value, event_unique_users, event_revenue_usd "
                "is required"]  # fmt: skip
    problems = []
    for metric in present:
        value = record[metric]
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            problems.append(f"{metric}: a number")
        elif metric in {"event_count", "event_unique_users"} and not (
            isinstance(value, int) and value >= 0
        ):
            problems.append(f"{metric}: a non-negative integer")
        elif isinstance(value, Decimal) and (
            not value.is_finite() or -int(value.as_tuple().exponent) > 6
        ):
            problems.append(f"{metric}: numeric(20,6), at most 6 decimals")
    return problems


def _check_dates(record: dict[str, Any]) -> list[str]:
    problems = []
    parsed = {}
    for name in ("event_date", "active_date"):
        value = record[name]
        try:
            if not _DATE.match(value):
                raise ValueError
            parsed[name] = date.fromisoformat(value)
        except ValueError:
            problems.append(f"{name}: yyyy-mm-dd")
    active = parsed.get("active_date")
    if active is not None:
        today = datetime.now(UTC).date()
        # one day of slack: the record's timezone may be ahead of or behind UTC
        if active < today - timedelta(days=91):
            problems.append("active_date: must be within the most recent 90 days")
    return problems
