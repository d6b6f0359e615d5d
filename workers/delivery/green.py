"""Direct requests of a gevent worker on geventhttpclient's pools: the same exchange as urllib3's
for about half the CPU.

bench/pacing_floor.py, one gevent process on the 2-core VM: a GET through the delivery
``Sender`` on urllib3 cost 0.41 ms of CPU in a burst and 1.57 ms sent alone (one every 20 ms,
a rate limit's pace); on geventhttpclient's pool 0.19 ms and 0.97 ms. Its HTTP parser
is C (llhttp) and its pool hands out gevent sockets without urllib3's layers of objects per
request. It needs gevent's hub, so ``HttpClient`` uses it in processes gevent patched (the
default worker pool); the threads pool, and any request through a proxy, stay on urllib3.

Everything around the exchange is ``HttpClient``'s, for both: default headers, redirects, the
proxy choice. What this module owes the sender is the same answers and failures: a status,
headers read as urllib3 reads them (a header sent twice joined with ", "), a body excerpt of at
most the asked bytes, decoded as the Content-Encoding says, and urllib3's exception for each
failure, so ``failure_of`` names them as before.

One difference: a kept connection the partner closed just as a GET (or another idempotent
method) went out is tried once more on a new one, within the same attempt (RFC 9110 9.2.2);
urllib3 with retries off would record a connection error and the delivery's next attempt would
send it again, with the same idempotency key. A POST is never re-sent by the client.
"""

from __future__ import annotations

import ssl
import zlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import brotli  # geventhttpclient's dependency; with it installed, requests advertises br
import gevent
from geventhttpclient import HTTPClient
from geventhttpclient._parser import HTTPParseError
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    LocationValueError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from schemas.errors import PostbackRelayError


class _TotalTimeout(PostbackRelayError):
    """The exchange outlived connect + read (urllib3's total)."""


def _decoder(encoding: str) -> Callable[[bytes], bytes] | None:
    """A chunk decoder for a Content-Encoding, None for identity; DecodeError for an unknown one."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if encoding == "deflate":
        return _Deflate().decompress
    if encoding == "br":
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    raise DecodeError(f"an answer encoded {encoding!r}, which this client does not decode")


class _Deflate:
    """deflate as sent: zlib-wrapped per the RFC, raw from some servers (urllib3 takes both)."""

    def __init__(self) -> None:
        self._first = True
        self._data = b""
        self._obj = zlib.decompressobj()

    def decompress(self, data: bytes) -> bytes:
        if not self._first:
            return self._obj.decompress(data)
        self._data += data
        try:
            decompressed = self._obj.decompress(data)
        except zlib.error:
            self._first = False
            self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._obj.decompress(self._data)
        if decompressed:
            self._first = False
            self._data = b""
        return decompressed


def _raised_in(exc: BaseException, function: str) -> bool:
    """Whether ``exc`` came through a function of that name: geventhttpclient connects and
    sends inside the request, and every phase times out as the same socket.timeout."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def _translated(exc: BaseException, url: str) -> Exception:
    """urllib3's exception for a failure of geventhttpclient or the socket under it; an
    OSError (refused, reset, unresolvable) stays itself, named a connection error as before."""
    if isinstance(exc, _TotalTimeout):
        return ReadTimeoutError(None, url, "the exchange outlived connect + read seconds")  # type: ignore[arg-type]
    if isinstance(exc, TimeoutError):
        if _raised_in(exc, "_create_socket"):
            return ConnectTimeoutError(f"connecting to {urlsplit(url).netloc} timed out")
        if _raised_in(exc, "sendall"):  # urllib3: the connection aborted, a connection error
            return ProtocolError("Connection aborted.", exc)
        return ReadTimeoutError(None, url, "read timed out")  # type: ignore[arg-type]
    for kind, urllib3_error in _AS_URLLIB3:
        if isinstance(exc, kind):
            return urllib3_error(f"{type(exc).__name__}: {exc}")
    assert isinstance(exc, Exception)
    return exc


# First match wins. ValueError: geventhttpclient refuses a target or header it cannot send.
_AS_URLLIB3: tuple[tuple[type[BaseException], type[Exception]], ...] = (
    (ssl.SSLError, SSLError),
    (HTTPParseError, ProtocolError),
    (ValueError, LocationValueError),
)


class GreenAnswer:
    """An answer whose body is read by ``read`` (bounded), then settled by ``close``."""

    def __init__(self, response: Any, url: str, read_timeout: float) -> None:
        self._response = response
        self._url = url
        self.status: int = response.status_code
        headers = _Headers()
        for name, value in response.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.headers: Mapping[str, str] = headers
        self._read_timeout = read_timeout

    def read(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body, decoded; the connection goes back to the pool
        when the body was read to its end, and is closed otherwise (``close``)."""
        decode = _decoder(self.headers.get("Content-Encoding") or "")
        out = bytearray()
        try:
            with gevent.Timeout(self._read_timeout, _TotalTimeout):
                while len(out) < limit:
                    chunk = self._response.read(min(16 * 1024, limit))
                    if not chunk:
                        break
                    out += decode(chunk) if decode is not None else chunk
        except (_TotalTimeout, OSError, HTTPParseError) as exc:
            self.close()
            raise _translated(exc, self._url) from None
        except zlib.error as exc:
            self.close()
            raise DecodeError(f"the body does not decode as it says: {exc}") from None
        return bytes(out[:limit])

    def close(self) -> None:
        """Back to the pool if its body was read whole, closed if not (its rest unread)."""
        self._response.release()


class _Headers(dict[str, str]):
    """Header names kept lower-case and looked up without case, as urllib3's headers are."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class GreenPools:
    """One geventhttpclient pool per scheme, host, port and timeouts, each holding up to
    ``maxsize`` keep-alive connections (urllib3's pools are sized the same)."""

    def __init__(self, ssl_context: ssl.SSLContext, maxsize: int) -> None:
        self.ssl_context = ssl_context
        self.maxsize = maxsize
        self._clients: dict[tuple[str, str, int | None, float, float], HTTPClient] = {}

    def _client(self, key: tuple[str, str, int | None, float, float]) -> HTTPClient:
        """The pool for (scheme, host, port, connect timeout, read timeout)."""
        client = self._clients.get(key)
        if client is None:
            scheme, host, port, connect, read = key
            https = scheme == "https"
            client = HTTPClient(
                host, port, ssl=https, concurrency=self.maxsize,
                connection_timeout=connect, network_timeout=read,
                ssl_context_factory=(lambda **_: self.ssl_context) if https else None,
                # No default headers of its own: HttpClient's are sent, and only they.
                headers={},
            )  # fmt: skip
            client.default_headers.clear()
            self._clients[key] = client
        return client

    def urlopen(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None,
        headers: Mapping[str, str],
        connect: float,
        read: float,
    ) -> GreenAnswer:
        split = urlsplit(url)
        if not split.hostname:
            raise LocationValueError(f"no host in {url!r}")
        try:
            port = split.port
        except ValueError as exc:
            raise LocationValueError(str(exc)) from None
        target = split.path or "/"
        if split.query:
            target = f"{target}?{split.query}"
        key = (split.scheme.lower(), split.hostname, port, connect, read)
        client = self._client(key)
        try:
            with gevent.Timeout(connect + read, _TotalTimeout):
                response = client.request(method, target, body=body or b"", headers=dict(headers))
        except _TotalTimeout as exc:
            # Cut short inside geventhttpclient (a body the partner would not take), its pool
            # may not have its connection's slot back: the next request gets a new pool.
            if self._clients.get(key) is client:
                del self._clients[key]
                client.close()
            raise _translated(exc, url) from None
        except (OSError, HTTPParseError, ValueError) as exc:
            raise _translated(exc, url) from None
        return GreenAnswer(response, url, read)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
