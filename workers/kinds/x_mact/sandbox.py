"""A sandbox X Ads API for conversion_event / conversion_attribution: tests, demo, benchmarks.

It checks what the real one checks as far as the public docs say: the OAuth 1.0a signature
(oauthlib's own server-side verifier), required parameters, enums, the time format, the hashed
device id's form, click_window >= view_through_window. It answers X's documented bodies, emits
x-rate-limit-* headers, and can be told to answer 429 / 5xx / 401 or to be slow.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from oauthlib.common import Request
from oauthlib.oauth1 import RequestValidator, SignatureOnlyEndpoint

from config.kinds.x_mact import X_CONVERSION_TYPES
from workers.dev.server import LocalServer

_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_HASHED_ID = re.compile(r"^[A-Za-z0-9+/]{43}=$")
_REQUIRED = ("app_id", "conversion_time", "conversion_type", "hashed_device_id", "os_type")


@dataclass(frozen=True)
class XCredentials:
    consumer_key: str
    consumer_secret: str
    access_token: str
    access_token_secret: str


@dataclass
class XRequest:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    status: int
    body: dict[str, Any]
    at: float


class _Validator(RequestValidator):
    """Knows exactly one client and one access token; remembers nonces."""

    def __init__(self, creds: XCredentials) -> None:
        super().__init__()
        self.creds = creds
        self.nonces: set[tuple[str, str]] = set()
        self.lock = threading.Lock()

    enforce_ssl = False  # the sandbox speaks plain HTTP on loopback

    def check_client_key(self, client_key: str) -> bool:
        return bool(client_key)

    def check_access_token(self, request_token: str) -> bool:
        return bool(request_token)

    def check_nonce(self, nonce: str) -> bool:
        return bool(nonce)

    @property
    def dummy_client(self) -> str:
        return "dummy-client"

    @property
    def dummy_access_token(self) -> str:
        return "dummy-token"

    def validate_client_key(self, client_key: str, request: Request) -> bool:
        return client_key == self.creds.consumer_key

    def validate_timestamp_and_nonce(  # noqa: PLR0917 - oauthlib's signature
        self,
        client_key: str,
        timestamp: Any,
        nonce: str,
        request: Request,
        request_token: str | None = None,
        access_token: str | None = None,
    ) -> bool:
        with self.lock:
            if (timestamp, nonce) in self.nonces:
                return False
            self.nonces.add((timestamp, nonce))
        return True

    def get_client_secret(self, client_key: str, request: Request) -> str:
        return self.creds.consumer_secret if client_key == self.creds.consumer_key else "dummy"

    def get_access_token_secret(self, client_key: str, token: str, request: Request) -> str:
        return self.creds.access_token_secret if token == self.creds.access_token else "dummy"


def _error(code: str, message: str, parameter: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if parameter:
        err["parameter"] = parameter
    return err


@dataclass
class SandboxX(LocalServer):
    creds: XCredentials
    attribution_share: float = 0.5  # share of hashed ids (deterministically) attributed to X
    rate_limit: int = 60_000
    rate_window: float = 900.0
    delay: float = 0.0
    requests: list[XRequest] = field(default_factory=list)
    # Scripted answers, used before normal handling: (status, body, headers) or None.
    script: list[tuple[int, dict[str, Any] | str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._validator = _Validator(self.creds)
        self._endpoint = SignatureOnlyEndpoint(self._validator)
        self._lock = threading.Lock()
        self._window_start = time.time()
        self._used = 0
        sandbox = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, body, headers = sandbox.answer(
                    self.command, self.path, dict(self.headers.items())
                )
                payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                content_type = "text/html" if isinstance(body, str) else "application/json"
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def fail_next(
        self, status: int, count: int = 1, code: str = "INTERNAL_ERROR",
        headers: dict[str, str] | None = None, html: bool = False,
    ) -> None:  # fmt: skip
        body: dict[str, Any] | str = (
            "<html><body>Not Found</body></html>" if html
            else {"errors": [_error(code, f"sandbox: scripted {status}")]}
        )  # fmt: skip
        with self._lock:
            self.script.extend([(status, body, headers or {})] * count)

    def _rate_headers(self) -> dict[str, str]:
        now = time.time()
        with self._lock:
            if now - self._window_start >= self.rate_window:
                self._window_start, self._used = now, 0
            self._used += 1
            remaining = max(0, self.rate_limit - self._used)
            reset = int(self._window_start + self.rate_window) + 1
        return {
            "x-rate-limit-limit": str(self.rate_limit),
            "x-rate-limit-remaining": str(remaining),
            "x-rate-limit-reset": str(reset),
        }

    def answer(
        self, method: str, target: str, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
        if self.delay:
            time.sleep(self.delay)
        split = urlsplit(target)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        rate = self._rate_headers()
        status, body, extra = self._decide(
            method, split.path, target, params, headers=headers, rate=rate
        )
        with self._lock:
            self.requests.append(
                XRequest(method, split.path, params, headers, status,
                         body if isinstance(body, dict) else {"html": body}, time.time())
            )  # fmt: skip
        return status, body, {**rate, **extra}

    def _decide(
        self, method: str, path: str, target: str, params: dict[str, str], *,
        headers: dict[str, str], rate: dict[str, str],
    ) -> tuple[int, dict[str, Any] | str, dict[str, str]]:  # fmt: skip
        with self._lock:
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            return scripted
        endpoint = path.rsplit("/", 1)[-1]
        expected = {"conversion_event": "POST", "conversion_attribution": "GET"}
        if expected.get(endpoint) != method:
            return 404, "<html><body>Sorry, that page does not exist</body></html>", {}
        host = headers.get("Host", "127.0.0.1")
        valid, request = self._endpoint.validate_request(
            f"http://{host}{target}", http_method=method, headers=headers
        )
        token = getattr(request, "resource_owner_key", None)
        if not valid or token != self.creds.access_token:
            return (
                401,
                {
                    "errors": [
                        _error("UNAUTHORIZED_ACCESS", "This request is not properly authenticated")
                    ]
                },
                {},
            )
        if int(rate["x-rate-limit-remaining"]) <= 0 and self._used > self.rate_limit:
            return 429, {"errors": [_error("TOO_MANY_REQUESTS", "Rate limit exceeded")]}, {}
        errors = self.check_params(params)
        if errors:
            return 400, {"errors": errors, "request": {"params": params}}, {}
        return 200, self._success(params), {}

    @staticmethod
    def check_params(params: dict[str, str]) -> list[dict[str, Any]]:
        errors = [
            _error("MISSING_PARAMETER", f"{name} is missing", name)
            for name in _REQUIRED
            if not params.get(name)
        ]
        checks: list[tuple[str, Callable[[str], bool], str]] = [
            ("conversion_time", lambda v: bool(_TIME.match(v)), "ISO-8601 UTC with milliseconds"),
            ("conversion_type", lambda v: v in X_CONVERSION_TYPES, "one of the 20 types"),
            ("os_type", lambda v: v in {"IOS", "ANDROID"}, "IOS or ANDROID"),
            ("hashed_device_id", lambda v: bool(_HASHED_ID.match(v)), "44-char base64 HMAC"),
            ("click_window", lambda v: v in {"1", "7", "14", "30"}, "1, 7, 14 or 30"),
            ("view_through_window", lambda v: v in {"0", "1", "7", "14", "30"},
             "0, 1, 7, 14 or 30"),
            ("price_micro", str.isdigit, "an integer"),
            ("number_items", str.isdigit, "an integer"),
            ("level", str.isdigit, "an integer"),
            ("price_currency", lambda v: bool(re.fullmatch(r"[A-Z]{3}", v)), "ISO 4217"),
        ]  # fmt: skip
        for name, ok, rule in checks:
            value = params.get(name)
            if value and not ok(value):
                errors.append(_error("INVALID_PARAMETER", f"{name} must be {rule}", name))
        click, view = params.get("click_window", "14"), params.get("view_through_window", "1")
        if click.isdigit() and view.isdigit() and int(view) > int(click):
            errors.append(_error("INVALID_PARAMETER",
                                 "click_window must be >= view_through_window",
                                 "view_through_window"))  # fmt: skip
        return errors

    def _success(self, params: dict[str, str]) -> dict[str, Any]:
        digest = hashlib.sha256(params["hashed_device_id"].encode()).digest()
        attributed = digest[0] / 256 < self.attribution_share
        twitter = None
        if attributed:
            twitter = {
                "engagement_type": "CLICK",
                "engagement_time": params["conversion_time"],
                "attribution_type": "DIRECT",
                "country_code": "US",
                "tweet_id": str(int.from_bytes(digest[1:9], "big")),
                "promoted_properties": {
                    "campaign_id": "sandbox-campaign",
                    "line_item_id": "sandbox-line-item",
                    "account_id": "sandbox-account",
                    "publisher_app_id": None,
                    "line_item_objective": "APP_INSTALLS",
                    "campaign_name": "sandbox campaign",
                },
            }
        return {
            "data": {**params, "twitter_attribution": twitter, "tpn_attribution": None},
            "request": {"params": params},
        }
