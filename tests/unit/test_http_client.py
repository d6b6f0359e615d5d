"""Deliveries' HTTP client and sender on a real local server: keep-alive reuse, the bounded body
read, timeouts, refusals and redirects classified as the requests session classified them, and
the environment read once, at start-up."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from requests.utils import DEFAULT_ACCEPT_ENCODING

from config.settings import Settings
from schemas.outcomes import Delivered, PermanentFailure, RetryLater
from tests.unit.test_http_session import DOT_SEGMENT_CASES
from workers.delivery.client import (
    CaBundleError,
    HttpClient,
    body_encoding,
    http_client,
    read_excerpt,
)
from workers.delivery.http import wire_url
from workers.delivery.sender import Sender
from workers.dev.receiver import PostbackReceiver
from workers.kinds.base import RESPONSE_READ_BYTES, DestinationAdapter, OutgoingRequest
from workers.logging import mask_secrets

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
              "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "REQUEST_METHOD")  # fmt: skip
SECRET = "s3cr3t-token-value"
BIG = RESPONSE_READ_BYTES * 3


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    port: int  # the client's port: one per connection
    headers: Message  # names compared without case


class Partner:
    """A partner with an answer per path, recording which connection each request came on."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        partner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def answer(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                path = self.path.partition("?")[0]
                partner.seen.append(Seen(self.command, path, self.client_address[1], self.headers))
                if path == "/big":
                    self.answer(200, b"x" * BIG)
                elif path == "/slow":
                    time.sleep(1.5)
                    self.answer(200, b"late")
                elif path == "/stall-body":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"0123456789")
                    self.wfile.flush()
                    time.sleep(1.5)
                elif path == "/redirect":
                    self.answer(302, b"moved", {"Location": "/ok?from=redirect"})
                elif path == "/loop":
                    self.answer(302, b"", {"Location": "/loop"})
                elif path == "/elsewhere":  # another host (localhost, not 127.0.0.1)
                    port = self.server.server_address[1]
                    self.answer(307, b"", {"Location": f"http://localhost:{port}/ok"})
                elif path == "/echo":
                    self.answer(400, f"bad token {SECRET} in {self.path}".encode())
                elif path == "/latin":
                    self.answer(200, "café".encode("latin-1"), {"Content-Type": "text/plain"})
                elif path == "/gzip":
                    self.answer(200, gzip.compress(b"{}" * BIG), {"Content-Encoding": "gzip"})
                elif path == "/twice":
                    self.send_response(429)
                    self.send_header("X-Rate", "a")
                    self.send_header("X-Rate", "b")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/unknown-charset":
                    self.answer(200, b"ok", {"Content-Type": "text/plain; charset=no-such"})
                else:
                    self.answer(201 if path == "/created" else 200, b'{"ok":true}')

            do_GET = do_POST = handle_any

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def ports(self) -> set[int]:
        return {seen.port for seen in self.seen}


@pytest.fixture
def partner() -> Iterator[Partner]:
    server = Partner()
    threading.Thread(target=server.server.serve_forever, daemon=True).start()
    yield server
    server.server.shutdown()
    server.server.server_close()


class Probe(DestinationAdapter):
    """The base class's classification, on a destination with one secret and short timeouts."""

    kind: ClassVar[str] = "probe"

    def __init__(self, connect: float = 2.0, read: float = 0.5) -> None:
        super().__init__(
            SimpleNamespace(  # type: ignore[arg-type]
                timeout=SimpleNamespace(connect=connect, read=read),
                secrets_to_mask=lambda: [SECRET],
            )
        )

    def build_request(self, envelope: Any) -> Any:
        raise NotImplementedError


@pytest.fixture(params=[False, True], ids=["urllib3", "geventhttpclient"])
def green(request: pytest.FixtureRequest) -> bool:
    """Each test on both transports: urllib3's pools and a gevent worker's geventhttpclient."""
    return bool(request.param)


@pytest.fixture
def sender(green: bool) -> Iterator[Sender]:
    client = http_client(Settings(), green=green)
    yield Sender(client)
    client.close()


def get(url: str, **kwargs: Any) -> OutgoingRequest:
    return OutgoingRequest("GET", url, url, **kwargs)


def test_sends_reuse_one_keep_alive_connection(partner: Partner, sender: Sender) -> None:
    for _ in range(5):
        outcome, seconds = sender.send(Probe(), get(partner.url + "/ok"))
        assert outcome == Delivered(200, '{"ok":true}')
        assert seconds > 0
    assert len(partner.seen) == 5
    assert len(partner.ports()) == 1
    assert partner.seen[0].headers["User-Agent"] == Settings().http_user_agent
    # As requests sent it: gzip, deflate, and br where a brotli module is installed (it is, with
    # geventhttpclient), each decoded by both transports.
    assert partner.seen[0].headers["Accept-Encoding"] == DEFAULT_ACCEPT_ENCODING


def test_an_adapters_header_replaces_a_default_of_the_same_name(
    partner: Partner, sender: Sender
) -> None:
    sender.send(Probe(), get(partner.url + "/ok", headers={"user-agent": "mine"}))
    assert partner.seen[0].headers["User-Agent"] == "mine"


def test_a_body_longer_than_the_bound_is_cut_and_its_connection_not_reused(
    partner: Partner, sender: Sender
) -> None:
    outcome, _ = sender.send(Probe(), get(partner.url + "/big"))
    assert isinstance(outcome, Delivered)
    assert outcome.body_excerpt == "x" * RESPONSE_READ_BYTES
    # The rest of the body is never read as the next answer: that one is on a new connection.
    outcome, _ = sender.send(Probe(), get(partner.url + "/created"))
    assert outcome == Delivered(201, '{"ok":true}')
    assert len(partner.ports()) == 2
    # ... which stays open for the one after.
    sender.send(Probe(), get(partner.url + "/ok"))
    assert len(partner.ports()) == 2


def test_an_answer_later_than_the_read_timeout_is_retried(partner: Partner, sender: Sender) -> None:
    outcome, _ = sender.send(Probe(read=0.3), get(partner.url + "/slow"))
    assert outcome == RetryLater("timeout (ReadTimeout)")


def test_a_body_that_stalls_past_the_read_timeout_is_retried_not_raised(
    partner: Partner, sender: Sender
) -> None:
    """requests' raw read let urllib3's ReadTimeoutError out of the sender (a dead letter as an
    unexpected error); it is a timeout like any other."""
    outcome, _ = sender.send(Probe(read=0.3), get(partner.url + "/stall-body"))
    assert outcome == RetryLater("timeout (ReadTimeout)")


def test_a_refused_connection_is_retried(sender: Sender) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        outcome, _ = sender.send(Probe(), get(f"http://127.0.0.1:{port}/pb"))
    assert outcome == RetryLater("connection error (ConnectionError)")


def test_an_unresolvable_host_is_a_connection_error(sender: Sender) -> None:
    outcome, _ = sender.send(Probe(), get("http://partner.invalid/pb"))
    assert outcome == RetryLater("connection error (ConnectionError)")


def test_a_url_that_is_not_http_is_a_permanent_request_error(sender: Sender) -> None:
    outcome, _ = sender.send(Probe(), get("ftp://partner.example/pb"))
    assert outcome == PermanentFailure("request error (InvalidSchema)")


def test_a_redirect_is_followed_as_requests_did_post_becoming_get(
    partner: Partner, sender: Sender
) -> None:
    request = OutgoingRequest("POST", partner.url + "/redirect", "", {}, b"a=1")
    outcome, _ = sender.send(Probe(), request)
    assert outcome == Delivered(200, '{"ok":true}')
    assert [(s.method, s.path) for s in partner.seen] == [("POST", "/redirect"), ("GET", "/ok")]
    assert "Content-Length" not in partner.seen[1].headers  # the body is not sent again
    assert len(partner.ports()) == 1  # the redirect's body was read: its connection reused


def test_a_redirect_not_to_be_followed_is_classified_as_its_status(
    partner: Partner, sender: Sender
) -> None:
    request = get(partner.url + "/redirect", follow_redirects=False)
    outcome, _ = sender.send(Probe(), request)
    assert outcome == PermanentFailure("HTTP 302", 302, "moved", alarm=False)
    assert [s.path for s in partner.seen] == ["/redirect"]


def test_a_redirect_loop_stops_where_requests_stopped(partner: Partner, sender: Sender) -> None:
    outcome, _ = sender.send(Probe(), get(partner.url + "/loop"))
    assert outcome == PermanentFailure("request error (TooManyRedirects)")
    assert len(partner.seen) == 5  # requests' max_redirects: the 5th redirect is not followed


def test_a_redirect_to_another_host_drops_the_authorization_header(
    partner: Partner, sender: Sender
) -> None:
    request = get(partner.url + "/elsewhere", headers={"Authorization": "OAuth secret"})
    outcome, _ = sender.send(Probe(), request)
    assert isinstance(outcome, Delivered)
    assert partner.seen[0].headers["Authorization"] == "OAuth secret"
    assert "Authorization" not in partner.seen[1].headers


def test_secrets_in_the_answer_are_masked(partner: Partner, sender: Sender) -> None:
    outcome, _ = sender.send(Probe(), get(partner.url + f"/echo?token={SECRET}"))
    assert isinstance(outcome, PermanentFailure)
    assert SECRET not in outcome.body_excerpt
    assert outcome.body_excerpt == mask_secrets(
        f"bad token {SECRET} in /echo?token={SECRET}", [SECRET]
    )


def test_the_excerpt_is_decoded_with_requests_choice_of_charset(
    partner: Partner, sender: Sender
) -> None:
    outcome, _ = sender.send(Probe(), get(partner.url + "/latin"))
    assert outcome == Delivered(200, "café")  # text/* without a charset: ISO-8859-1


def test_a_compressed_answer_is_decoded_and_cut_at_the_bound(
    partner: Partner, sender: Sender
) -> None:
    outcome, _ = sender.send(Probe(), get(partner.url + "/gzip"))
    assert outcome == Delivered(200, ("{}" * BIG)[:RESPONSE_READ_BYTES])


def test_a_header_sent_twice_reads_as_its_values_joined(green: bool, partner: Partner) -> None:
    client = http_client(Settings(), green=green)
    try:
        timeout = Sender(client).timeout(2.0, 0.5)
        answer = client.open("GET", partner.url + "/twice", headers={}, body=None,
                             timeout=timeout, follow_redirects=True)  # fmt: skip
        assert (answer.status, answer.headers.get("x-rate")) == (429, "a, b")
        assert read_excerpt(answer, 10) == b""
    finally:
        client.close()


def test_an_unknown_charset_reads_as_utf8_instead_of_raising(
    partner: Partner, sender: Sender
) -> None:
    """``bytes.decode`` raised LookupError out of the sender for a charset Python lacks."""
    outcome, _ = sender.send(Probe(), get(partner.url + "/unknown-charset"))
    assert outcome == Delivered(200, "ok")


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, "utf-8"),
        ("application/json", "utf-8"),
        ("text/html", "ISO-8859-1"),
        ("text/html; charset=UTF-8", "UTF-8"),
        ('application/json; Charset="iso-8859-2"', "iso-8859-2"),
        ("text/plain; format=flowed; charset='koi8-r'", "koi8-r"),
    ],
)
def test_body_encoding_is_requests_choice(content_type: str | None, expected: str) -> None:
    import requests.utils

    assert body_encoding(content_type) == expected
    if content_type is not None:  # requests answers None where it falls back (to utf-8)
        chosen = requests.utils.get_encoding_from_headers({"content-type": content_type})
        assert (chosen or "utf-8") == expected


# --- the environment, read once (as tests/unit/test_http_session.py for the session) -----------


def test_credentials_in_the_proxy_url_are_sent_as_proxy_authorization(
    monkeypatch: pytest.MonkeyPatch, receiver: PostbackReceiver
) -> None:
    monkeypatch.setenv("HTTP_PROXY", receiver.url.replace("://", "://user:p%40ss@"))
    sender = Sender(http_client(Settings()))
    sender.send(Probe(), get("http://partner.invalid/pb"))
    (got,) = receiver.wait_for(1, timeout=5)
    headers = {name.lower(): value for name, value in got.headers.items()}
    assert headers["proxy-authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss


def test_a_dead_proxy_is_a_retryable_proxy_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    outcome, _ = Sender(http_client(Settings())).send(Probe(), get("http://partner.example/"))
    assert outcome == RetryLater("connection error (ProxyError)")


def test_the_environment_is_read_when_the_client_is_built_not_per_request(
    monkeypatch: pytest.MonkeyPatch, receiver: PostbackReceiver
) -> None:
    sender = Sender(http_client(Settings()))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # set after start-up: not used
    outcome, _ = sender.send(Probe(), get(receiver.url + "/pb"))
    assert isinstance(outcome, Delivered)
    # A new process would use it (and fail: nothing listens there).
    outcome, _ = Sender(http_client(Settings())).send(Probe(), get(receiver.url + "/pb"))
    assert outcome == RetryLater("connection error (ProxyError)")


def test_no_request_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, partner: Partner, sender: Sender
) -> None:
    import urllib.request

    def scanned(*_: Any, **__: Any) -> Any:
        raise AssertionError("the environment was read for a request")

    class Unreadable(dict[str, str]):
        __getitem__ = get = __iter__ = __contains__ = items = keys = scanned  # type: ignore[assignment]

    monkeypatch.setattr(urllib.request, "getproxies_environment", scanned)
    monkeypatch.setattr(urllib.request, "proxy_bypass_environment", scanned)
    environ = os.environ
    os.environ = Unreadable()  # type: ignore[assignment]  # noqa: B003 - a stand-in, put back below
    try:
        outcome, _ = sender.send(Probe(), get(partner.url + "/ok"))
    finally:
        os.environ = environ  # noqa: B003
    assert isinstance(outcome, Delivered)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out",
         cert, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_partner(partner: Partner, certificate: tuple[Path, Path]) -> Partner:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    partner.server.socket = context.wrap_socket(partner.server.socket, server_side=True)
    partner.url = partner.url.replace("http://", "https://")
    return partner


def test_https_is_verified_against_the_ca_bundle_named_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
    tls_partner: Partner,
    certificate: tuple[Path, Path],
    green: bool,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    client = http_client(Settings(), green=green)
    for _ in range(3):
        outcome, _ = Sender(client).send(Probe(), get(tls_partner.url + "/ok"))
        assert outcome == Delivered(200, '{"ok":true}')
    client.close()
    assert len(tls_partner.ports()) == 1  # one TLS handshake, then keep-alive


def test_https_to_a_certificate_no_bundle_trusts_is_a_retryable_ssl_error(
    tls_partner: Partner, green: bool
) -> None:
    sender = Sender(http_client(Settings(), green=green))
    outcome, _ = sender.send(Probe(), get(tls_partner.url + "/ok"))
    assert outcome == RetryLater("connection error (SSLError)")  # certifi's bundle, as requests


def test_ca_bundle_variables_set_verification(
    monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    assert HttpClient("ua").ca_bundle is None  # certifi's bundle, as requests (not the system's)
    assert len(HttpClient("ua").ssl_context.get_ca_certs()) > 50
    monkeypatch.setenv("CURL_CA_BUNDLE", str(certificate[0]))
    assert HttpClient("ua").ca_bundle == str(certificate[0])
    assert len(HttpClient("ua").ssl_context.get_ca_certs()) == 1
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(CaBundleError, match=r"missing\.pem"):  # requests' order: this one wins
        HttpClient("ua")


def test_the_pools_are_sized_as_the_session_was() -> None:
    client = http_client(Settings(worker_concurrency=64, batch_size=1))
    assert (client.direct.pools._maxsize, client.pool_kwargs["maxsize"]) == (32, 64)
    # With batches, a connection kept for each delivery in flight (tasks x batch size).
    batched = http_client(Settings(worker_concurrency=64, batch_size=50))
    assert batched.pool_kwargs["maxsize"] == 64 * 50
    assert client.pool_kwargs["ssl_context"] is client.ssl_context  # one, for every connection
    assert client.pool_kwargs["block"] is False


@pytest.mark.parametrize(("written", "sent"), DOT_SEGMENT_CASES)
def test_a_wire_url_is_sent_as_it_reads(
    receiver: PostbackReceiver, sender: Sender, written: str, sent: str
) -> None:
    """Adapters send ``wire_url``'s form; the client must not change it on the way."""
    outcome, _ = sender.send(Probe(), get(wire_url(receiver.url + written)))
    assert isinstance(outcome, Delivered)
    (got,) = receiver.wait_for(1, timeout=5)
    assert got.raw_target == sent


def test_a_partner_that_will_not_take_the_body_is_a_connection_error(green: bool) -> None:
    """A POST whose body the partner never reads: the blocked send times out, named as urllib3
    names it on both transports, and the slot it held is free for the next request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepted by the kernel, never read
        port = listener.getsockname()[1]
        client = http_client(Settings(), green=green)
        try:
            sender = Sender(client)
            body = b"x" * (16 * 1024 * 1024)  # far more than the socket buffers hold
            request = OutgoingRequest("POST", f"http://127.0.0.1:{port}/pb", "", {}, body)
            for _ in range(2):
                outcome, seconds = sender.send(Probe(connect=0.3, read=0.3), request)
                assert outcome == RetryLater("connection error (ConnectionError)")
                assert seconds < 5
        finally:
            client.close()
