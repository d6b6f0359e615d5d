"""Deliveries' HTTP client, on urllib3's pools directly, and what one send reads of an answer.

requests cost 1.8x the CPU per request of this client here (bench/http_sender.py: 0.40 against
0.22 ms, bare urllib3 0.18 ms). What requests' session did is kept: its default headers and
User-Agent, its proxies and CA bundle (read once, at start-up), its redirect rules (up to 4
followed, methods changed as browsers do, Authorization dropped across hosts), its pool sizes,
and its names for errors, so the reasons in attempt records and dead letters read as before.
What it did not do: bound the body of a redirect it read, time out a stalled body as an
outcome, and survive a charset Python does not know.
"""

from __future__ import annotations

import os
import re
import ssl
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import certifi
import urllib3
from requests.utils import DEFAULT_ACCEPT_ENCODING, requote_uri
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    LocationValueError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    SSLError,
    URLSchemeUnknown,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.ssl_ import create_urllib3_context

from config.settings import Settings
from schemas.errors import PostbackRelayError
from workers.delivery.green import GreenAnswer, GreenPools
from workers.delivery.http import HttpFailure

# Redirects as requests follows them: at most 4 followed, the 5th is an error (its max_redirects).
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HTTP_URL = re.compile(r"https?://", re.IGNORECASE)


class CaBundleError(PostbackRelayError):
    """The CA bundle the environment names cannot be read (requests failed each HTTPS request
    on it; the client fails when it is built)."""


class TooManyRedirects(PostbackRelayError):
    """A partner redirected more often than requests would have followed."""


# urllib3's errors (and the socket's under them) as requests reported them, first match wins, in
# requests' order: a dead proxy's connection error is a ProxyError, and urllib3's
# NewConnectionError (refused, unresolvable) is a ConnectTimeoutError that requests calls a
# ConnectionError, not a timeout.
_FAILURES: tuple[tuple[type[Exception] | tuple[type[Exception], ...], HttpFailure], ...] = (
    (ProxyError, HttpFailure("connection", "ProxyError")),
    (SSLError, HttpFailure("connection", "SSLError")),
    (NewConnectionError, HttpFailure("connection", "ConnectionError")),
    (ConnectTimeoutError, HttpFailure("timeout", "ConnectTimeout")),
    (Urllib3Timeout, HttpFailure("timeout", "ReadTimeout")),
    (DecodeError, HttpFailure("request", "ContentDecodingError")),
    (URLSchemeUnknown, HttpFailure("request", "InvalidSchema")),
    (LocationValueError, HttpFailure("request", "InvalidURL")),
    (TooManyRedirects, HttpFailure("request", "TooManyRedirects")),
    ((ProtocolError, OSError), HttpFailure("connection", "ConnectionError")),
)


def failure_of(exc: Exception) -> HttpFailure:
    """An exception from urllib3 (or the socket under it) as the failure requests reported."""
    for kinds, failure in _FAILURES:
        if isinstance(exc, kinds):
            return failure
    return HttpFailure("request", type(exc).__name__)


def body_encoding(content_type: str | None) -> str:
    """The charset an answer's excerpt is decoded with, chosen as requests chose it: the charset
    parameter, ISO-8859-1 for text/* without one (RFC 2616), UTF-8 otherwise."""
    if not content_type:
        return "utf-8"
    media_type, *params = content_type.split(";")
    for param in params:
        name, sep, value = param.partition("=")
        if sep and name.strip("\"' ").lower() == "charset":
            return value.strip("\"' ") or "utf-8"
    return "ISO-8859-1" if "text" in media_type.strip() else "utf-8"


Answer = urllib3.BaseHTTPResponse | GreenAnswer


def read_excerpt(response: Answer, limit: int) -> bytes:
    """At most ``limit`` bytes of the body (decoded), never more, then the connection is settled.

    A body read to its end has already sent the connection back to the pool (urllib3 does when
    the body ends). A longer body is not drained, which could take as long as the partner likes:
    the connection is closed instead, so the next request on it cannot read this one's rest,
    and its place in the pool reconnects on next use."""
    if isinstance(response, GreenAnswer):
        return response.read(limit)  # settles its connection itself
    try:
        return response.read(limit, decode_content=True)
    finally:
        if response.connection is not None:
            response.close()
            response.release_conn()


def _verifying_context(ca: str) -> ssl.SSLContext:
    """One TLS context for every connection, its CA bundle loaded once: requests (and urllib3
    given a path) load the whole bundle again for each new connection."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    try:
        if os.path.isdir(ca):
            context.load_verify_locations(capath=ca)
        else:
            context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise CaBundleError(
            f"the CA bundle {ca} (REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE) cannot be read: {exc}"
        ) from None
    return context


def _merged(defaults: dict[str, str], headers: Mapping[str, str]) -> dict[str, str]:
    """``defaults`` with ``headers`` over them, names compared without case (HTTP's rule)."""
    sent = dict(defaults)
    for name, value in headers.items():
        if name not in sent:
            replaced = [default for default in sent if default.lower() == name.lower()]
            for default in replaced:
                del sent[default]
        sent[name] = value
    return sent


def _strips_auth(old_url: str, new_url: str) -> bool:
    """Whether a redirect from ``old_url`` to ``new_url`` drops Authorization (requests' rule)."""
    old, new = urlsplit(old_url), urlsplit(new_url)
    if old.hostname != new.hostname:
        return True
    upgraded = old.scheme == "http" and new.scheme == "https"
    if upgraded and old.port in (80, None) and new.port in (443, None):
        return False
    default = (_DEFAULT_PORTS.get(old.scheme), None)
    if old.scheme == new.scheme and old.port in default and new.port in default:
        return False
    return old.port != new.port or old.scheme != new.scheme


def _redirect_target(url: str, location: str) -> str:
    """The URL a Location header sends to, as requests builds it (fragment kept, re-quoted)."""
    # http.client decodes header bytes as latin-1; partners send UTF-8 in practice.
    location = location.encode("latin-1", errors="ignore").decode("utf-8", errors="replace")
    previous = urlsplit(url)
    if location.startswith("//"):
        location = f"{previous.scheme}:{location}"
    target = urlsplit(location)
    if not target.fragment and previous.fragment:
        target = target._replace(fragment=previous.fragment)
    if not target.netloc:
        return urljoin(url, requote_uri(target.geturl()))
    return requote_uri(target.geturl())


class HttpClient:
    """Deliveries' HTTP on urllib3's pools: one ``PoolManager`` for direct requests and one
    ``ProxyManager`` per proxy the environment named at start-up. Redirects, default headers,
    proxies and certificates as requests' session had them, without its per-request cost."""

    def __init__(
        self, user_agent: str, *, num_pools: int = 32, maxsize: int = 10, green: bool = False
    ) -> None:
        """``green``: direct requests on geventhttpclient's pools (workers/delivery/green.py),
        for a process gevent patched; proxied ones stay on urllib3."""
        # The same reading of the *_proxy variables as requests makes (it asks urllib too).
        self.env_proxies: dict[str, str] = urllib.request.getproxies_environment()
        # requests' CA bundle: its variables, else certifi's (not the system's, as urllib3's is).
        self.ca_bundle = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
        )
        self.ssl_context = _verifying_context(self.ca_bundle or certifi.where())
        self.pool_kwargs: dict[str, Any] = {
            "num_pools": num_pools,
            "maxsize": maxsize,
            "block": False,  # as requests: past maxsize, a connection is opened and not kept
            "ssl_context": self.ssl_context,
        }
        self.direct = urllib3.PoolManager(**self.pool_kwargs)
        self.green = GreenPools(self.ssl_context, maxsize) if green else None
        self.proxied = {
            proxy: self._proxy_manager(proxy)
            for scheme, proxy in self.env_proxies.items()
            if scheme != "no"
        }
        # requests' session headers; an adapter's header of the same name replaces one. A plain
        # dict: urllib3's case-insensitive HTTPHeaderDict cost a tenth of the client's own CPU.
        self.headers = {
            "User-Agent": user_agent,
            "Accept-Encoding": DEFAULT_ACCEPT_ENCODING,
            "Accept": "*/*",
            "Connection": "keep-alive",
        }

    def _proxy_manager(self, proxy: str) -> urllib3.PoolManager:
        if proxy.lower().startswith("socks"):
            from urllib3.contrib.socks import SOCKSProxyManager  # needs PySocks, as requests

            return SOCKSProxyManager(proxy, **self.pool_kwargs)
        split = urlsplit(proxy)
        headers = {}
        if split.username:  # requests' Proxy-Authorization from credentials in the proxy URL
            credentials = f"{unquote(split.username)}:{unquote(split.password or '')}"
            headers = urllib3.make_headers(proxy_basic_auth=credentials)
        return urllib3.ProxyManager(proxy, proxy_headers=headers, **self.pool_kwargs)

    def close(self) -> None:
        """Close every pooled connection (tests; a worker keeps its pools until it exits)."""
        for manager in (self.direct, *self.proxied.values()):
            manager.clear()
        if self.green is not None:
            self.green.close()

    def proxy_for(self, url: str) -> str | None:
        """The proxy for ``url`` by the start-up environment (None when none or bypassed)."""
        if not self.env_proxies:
            return None
        split = urlsplit(url)
        # no_proxy as urllib (and so requests) reads it; typeshed does not list this function.
        if urllib.request.proxy_bypass_environment(split.hostname or "", self.env_proxies):  # type: ignore[attr-defined]
            return None
        return self.env_proxies.get(split.scheme.lower()) or self.env_proxies.get("all")

    def open(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: urllib3.Timeout,
        follow_redirects: bool,
    ) -> Answer:
        """The answer with its body unread (``read_excerpt`` reads it). Raises urllib3's errors
        (``failure_of`` names them) and ``TooManyRedirects``; never retries."""
        sent = _merged(self.headers, headers)
        redirects = 0
        while True:
            if not _HTTP_URL.match(url):
                raise URLSchemeUnknown(url.partition(":")[0] if ":" in url else "(none)")
            proxy = self.proxy_for(url)
            response: Answer
            if proxy is None and self.green is not None:
                response = self.green.urlopen(method, url, body=body, headers=sent,
                                              connect=timeout.connect_timeout,  # type: ignore[arg-type]
                                              read=timeout.read_timeout)  # type: ignore[arg-type]  # fmt: skip
            else:
                manager = self.direct if proxy is None else self.proxied[proxy]
                response = manager.urlopen(
                    method, url, body=body, headers=sent, timeout=timeout, retries=False,
                    redirect=False, preload_content=False, decode_content=True,
                )  # fmt: skip
            location = response.headers.get("Location")
            if not follow_redirects or location is None or response.status not in REDIRECT_STATUSES:
                return response
            read_excerpt(response, 64 * 1024)  # requests read it whole, without a bound
            redirects += 1
            if redirects >= MAX_REDIRECTS:
                raise TooManyRedirects(f"Exceeded {MAX_REDIRECTS} redirects.")
            target = _redirect_target(url, location)
            status = response.status
            # Browsers' (and requests') method changes: 303 and 302 become GET, a POST's 301 too.
            if method != "HEAD" and (status in (302, 303) or (status == 301 and method == "POST")):
                method = "GET"
            dropped = {"cookie"}
            if status not in (307, 308):
                dropped |= {"content-length", "content-type", "transfer-encoding"}
                body = None
            if _strips_auth(url, target):
                dropped.add("authorization")
            sent = {name: value for name, value in sent.items() if name.lower() not in dropped}
            url = target


def http_client(settings: Settings, *, green: bool | None = None) -> HttpClient:
    """Deliveries' client, one per process: keep-alive to each partner, one connection per
    delivery the process may send at once (concurrency x batch size). ``green``: on
    geventhttpclient's pools; by default where gevent patched the process (its pool needs the
    hub, which the threads pool's threads do not share)."""
    from workers.delivery.batch import gevent_patched

    in_flight = max(10, settings.deliveries_in_flight)
    green = gevent_patched() if green is None else green
    return HttpClient(settings.http_user_agent, num_pools=32, maxsize=in_flight, green=green)
