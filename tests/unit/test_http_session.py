"""The worker's HTTP session reads proxy and CA settings from the environment once, at start-up
(deliveries' client too: tests/unit/test_http_client.py)."""

from __future__ import annotations

import pytest
import requests
import urllib3

from config.settings import Settings
from workers.delivery.client import http_client
from workers.delivery.http import StartupEnvSession, http_session, wire_url
from workers.dev.receiver import PostbackReceiver

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
              "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "REQUEST_METHOD")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


def status_of_get(via: str, url: str) -> int:
    """GET ``url`` with a client built now: the reconciler's session or deliveries' client."""
    if via == "session":
        return http_session(Settings()).get(url, timeout=5).status_code
    response = http_client(Settings()).open(
        "GET", url, headers={}, body=None, timeout=urllib3.Timeout(5), follow_redirects=True
    )
    return response.status


@pytest.mark.parametrize("via", ["session", "client"])
def test_a_proxy_from_the_environment_carries_the_request(
    monkeypatch: pytest.MonkeyPatch, receiver: PostbackReceiver, via: str
) -> None:
    monkeypatch.setenv("HTTP_PROXY", receiver.url)
    # partner.invalid cannot resolve: the request can only arrive through the proxy.
    assert status_of_get(via, "http://partner.invalid/pb?idfa=1") == 200
    (got,) = receiver.wait_for(1, timeout=5)
    assert got.raw_target == "http://partner.invalid/pb?idfa=1"  # absolute form: a proxy request
    assert got.headers["Host"] == "partner.invalid"


@pytest.mark.parametrize("via", ["session", "client"])
def test_no_proxy_hosts_are_reached_directly(
    monkeypatch: pytest.MonkeyPatch, receiver: PostbackReceiver, via: str
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens: would fail
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    session = http_session(Settings())
    assert session.proxies_for(receiver.url + "/pb") == {}
    assert session.proxies_for("http://partner.example/pb") == {"http": "http://127.0.0.1:9"}
    client = http_client(Settings())
    assert client.proxy_for(receiver.url + "/pb") is None
    assert client.proxy_for("http://partner.example/pb") == "http://127.0.0.1:9"
    assert status_of_get(via, receiver.url + "/pb?x=1") == 200
    (got,) = receiver.wait_for(1, timeout=5)
    assert got.raw_target == "/pb?x=1"


def test_the_environment_is_read_when_the_session_is_built_not_per_request(
    monkeypatch: pytest.MonkeyPatch, receiver: PostbackReceiver
) -> None:
    session = StartupEnvSession()
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # set after start-up: not used
    assert session.get(receiver.url + "/pb", timeout=5).status_code == 200
    with pytest.raises(requests.ConnectionError):
        StartupEnvSession().get(receiver.url + "/pb", timeout=5)  # a new process would use it


def test_ca_bundle_variables_set_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StartupEnvSession().verify is True
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/curl.pem")
    assert StartupEnvSession().verify == "/etc/ssl/curl.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/requests.pem")
    assert StartupEnvSession().verify == "/etc/ssl/requests.pem"  # requests' precedence


def test_an_explicit_proxies_argument_wins(
    monkeypatch: pytest.MonkeyPatch, receiver: PostbackReceiver
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    session = StartupEnvSession()
    assert session.get(receiver.url + "/pb", proxies={}, timeout=5).status_code == 200


# (a URL as written, its request target as the partner receives it): also tests/unit/test_http_client.py
DOT_SEGMENT_CASES = [
    ("/pb/%2E%2E/end", "/pb/%2E%2E/end"),
    ("/pb/%2e/end", "/pb/%2E/end"),
    ("/pb/.%2E?x=..", "/pb/%2E%2E?x=.."),  # the query has no segments to resolve
    ("/pb/x/../end", "/pb/end"),  # written as a dot segment: resolved, as requests always did
    ("/pb/caf\u00e9/a[1]#frag", "/pb/caf%C3%A9/a%5B1%5D"),  # encoded; a fragment is not sent
]


@pytest.mark.parametrize(("written", "sent"), DOT_SEGMENT_CASES)
def test_a_percent_encoded_dot_segment_is_sent_as_written_and_wire_url_says_so(
    receiver: PostbackReceiver, written: str, sent: str
) -> None:
    """requests decodes %2E to '.': the partner would resolve the segment as "up one level"."""
    response = http_session(Settings()).get(receiver.url + written, timeout=5)
    assert response.status_code == 200
    (got,) = receiver.wait_for(1, timeout=5)
    assert got.raw_target == sent
    assert wire_url(receiver.url + written) == receiver.url + sent
