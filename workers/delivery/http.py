"""The worker's HTTP: what adapters see of an answer, and the requests session of the reconciler.

Deliveries go through ``HttpClient`` (workers/delivery/client.py), on urllib3's pools. Adapters
see a partner's answer as an ``HttpAnswer`` and a failure to get one as an ``HttpFailure``, so
no adapter depends on an HTTP library. The reconciler keeps a ``requests`` session
(``http_session``; ``x-check`` uses it too): it streams AppMetrica's export through ijson, once
a run, where the CPU per request does not matter.

requests looks at the environment on every request when ``trust_env`` is on: proxy variables
(scanning all of ``os.environ`` two or three times), ``no_proxy``, ``~/.netrc`` and the CA
bundle variables. In a worker profile that was a third of the CPU of a whole delivery. Both
clients read the same variables once, when built, and every request uses that reading: change a
proxy variable and restart the worker, as for every other setting. ``~/.netrc`` credentials are
not used (a partner's credentials belong in the destinations file).

The URL an adapter builds is the URL sent: requests prepares a URL by undoing the percent-encoding
of every unreserved character, '.' included, so a path segment written "%2E%2E" (an event value,
sent as data) would leave as "..", which the partner resolves as "up one level". The session
keeps such segments encoded, and ``wire_url`` gives adapters the prepared form to send and log
(``HttpClient`` sends it unchanged).

``retry_after_seconds`` reads a Retry-After answer as HTTP defines it, for every adapter's
classification and for the reconciler.
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from config.settings import Settings

# After urllib3 has removed the dot segments written as such, any "." or ".." path segment left in
# a prepared URL was written percent-encoded.
_PREPARED_PATH = re.compile(r"https?://[^/?#]*(?P<path>[^?#]*)", re.IGNORECASE)
_DECODED_DOT_SEGMENT = re.compile(r"(?<=/)\.{1,2}(?=/|$)")


def keep_encoded_dot_segments(prepared_url: str) -> str:
    """Put back the %2E of the dot segments that requests decoded while preparing a URL."""
    match = _PREPARED_PATH.match(prepared_url)
    if match is None or "." not in match["path"]:
        return prepared_url
    start, end = match.span("path")
    path = _DECODED_DOT_SEGMENT.sub(lambda dots: "%2E" * len(dots[0]), match["path"])
    return prepared_url[:start] + path + prepared_url[end:]


def wire_url(url: str) -> str:
    """``url`` as the session sends it: the request target exactly as the partner receives it,
    after the scheme and host. The fragment is left out: a client never sends it."""
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    assert prepared.url is not None
    return keep_encoded_dot_segments(prepared.url).partition("#")[0]


class StartupEnvSession(requests.Session):
    """A ``requests.Session`` whose proxies and CA bundle come from the environment at start-up."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        # The same reading of the *_proxy variables as requests makes (it asks urllib too).
        self.env_proxies: dict[str, str] = urllib.request.getproxies_environment()
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if ca_bundle:
            self.verify = ca_bundle

    def proxies_for(self, url: str) -> dict[str, str]:
        """The proxies for ``url`` by the start-up environment ({} when none or bypassed)."""
        if not self.env_proxies:
            return {}
        host = urlsplit(url).hostname or ""
        # no_proxy as urllib (and so requests) reads it; typeshed does not list this function.
        if urllib.request.proxy_bypass_environment(host, self.env_proxies):  # type: ignore[attr-defined]
            return {}
        return {k: v for k, v in self.env_proxies.items() if k != "no"}

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        prepared = super().prepare_request(request)
        if prepared.url is not None:
            prepared.url = keep_encoded_dot_segments(prepared.url)
        return prepared

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if self.env_proxies and kwargs.get("proxies") is None:
            text = url.decode() if isinstance(url, bytes) else url
            kwargs["proxies"] = self.proxies_for(text)
        return super().request(method, url, *args, **kwargs)


def http_session(settings: Settings) -> StartupEnvSession:
    """One pooled session per process (the reconciler's, and x-check's): keep-alive to each
    partner, sized to the concurrency."""
    session = StartupEnvSession()
    adapter = HTTPAdapter(
        pool_connections=32, pool_maxsize=max(10, settings.concurrency), max_retries=0
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = settings.http_user_agent
    session.max_redirects = 5
    return session


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A partner's answer as an adapter classifies it: the status and the headers, names in
    lower case. The body reaches adapters only as the excerpt with our secrets masked."""

    status: int
    headers: Mapping[str, str]

    @classmethod
    def of(cls, status: int, headers: Mapping[str, str]) -> HttpAnswer:
        # A header sent twice reads as its values joined by ", " (urllib3's and requests' way).
        return cls(status, {name.lower(): headers[name] for name in headers})

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True, slots=True)
class HttpFailure:
    """No answer. ``name`` is the error as requests named it, so the reasons kept in attempt
    records and dead letters ("timeout (ReadTimeout)") read as they did before urllib3."""

    kind: Literal["timeout", "connection", "request"]
    name: str


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
