"""The X MACT destination without worker processes: the exact signed request, the hashed
device id (vectors computed here with hmac/hashlib directly), routing and skips, config
validation, classification of X's answers, and the server-announced rate budget in real Redis.

SandboxX (oauthlib's server-side verifier) runs in this process where a signature must verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import limits
import pytest
import redis
import requests
from celery import Celery
from click.testing import CliRunner

from config.destination_base import ConfigError
from config.destinations import Destinations, load_destinations, parse_destinations
from config.keys import RedisKeys, queue_for
from config.kinds import KINDS
from config.kinds.x_mact import DEFAULT_X_CONVERSIONS, X_CREDENTIALS, XMactDestination
from config.settings import Settings
from schemas.envelope import DeliveryEnvelope, delivery_id_for
from schemas.event import ConversionEvent
from schemas.outcomes import Delivered, PermanentFailure, RateBudget, RetryLater, Skipped
from workers.broker.wire import TaskMessageEncoder
from workers.cli.main import main
from workers.delivery.client import HttpClient, http_client
from workers.delivery.http import HttpAnswer
from workers.delivery.pipeline import DeliveryPipeline
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry, Reservation
from workers.delivery.sender import Sender
from workers.kinds.base import OutgoingRequest
from workers.kinds.x_mact.adapter import XMactAdapter, price_micro
from workers.kinds.x_mact.sandbox import SandboxX, XCredentials
from workers.metrics import MetricsRecorder
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger
from workers.stores.requeue import Requeuer

KEYS = RedisKeys("pr")
ROOT = Path(__file__).resolve().parents[2]

CK = "ck-consumer-key-4711"
CS = "cs-Consumer-Secret-9f8e7d6c"
AT = "at-1234567890-AccessToken"
ATS = "ats-Token-Secret-5a4b3c2d"
PARTNER_KEY_BYTES = b"partner-hmac-key-for-tests-32byt"
PK = base64.b64encode(PARTNER_KEY_BYTES).decode()
ENV = {"X_CK": CK, "X_CS": CS, "X_AT": AT, "X_ATS": ATS, "X_PK": PK}
CREDENTIAL_ENV = dict(zip(X_CREDENTIALS, ("X_CK", "X_CS", "X_AT", "X_ATS", "X_PK"), strict=True))

IDFA = "6d92078A-8246-4ba4-AE5B-76104861e7dc"  # mixed case on purpose: idfa_case must matter
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"
ANDROID_ID = "9774d56d682e549c"


def credentials_toml(names: tuple[str, ...] = X_CREDENTIALS) -> str:
    inner = ", ".join(f'{n} = {{ env = "{CREDENTIAL_ENV[n]}" }}' for n in names)
    return f"credentials = {{ {inner} }}"


def x_toml(base_url: str | None = None, extra: str = "", creds: str | None = None) -> str:
    base = f'base_url = "{base_url}"' if base_url else ""
    return f"""
[[destination]]
name = "x"
kind = "x_mact"
{base}
{credentials_toml() if creds is None else creds}
{extra}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"
"""


def x_destinations(
    base_url: str | None = None, extra: str = "", environ: dict[str, str] | None = None
) -> Destinations:
    data = tomllib.loads(x_toml(base_url, extra))
    return parse_destinations(data).with_secrets(environ or ENV, kinds=KINDS)


def x_adapter(
    base_url: str | None = None, extra: str = "", environ: dict[str, str] | None = None
) -> XMactAdapter:
    dest = x_destinations(base_url, extra, environ).get("x")
    assert isinstance(dest, XMactDestination)
    return XMactAdapter(dest)


def ios_event(**extra: Any) -> dict[str, Any]:
    return {
        "event_id": "ios-install-1",
        "app_id": "id333903271",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T11:00:00.123456+01:00",
        "idfa": IDFA,
        "ip": "192.133.78.1",
        **extra,
    }


def android_event(**extra: Any) -> dict[str, Any]:
    return {
        "event_id": "android-purchase-1",
        "app_id": "com.example.game",
        "platform": "android",
        "event_name": "af_purchase",
        "event_time": "2026-11-22T10:05:00.5Z",
        "gaid": GAID,
        "ip": "2001:db8::1",
        "revenue": "4.99",
        "currency": "eur",
        "event_values": {"af_quantity": 3, "af_level": "7", "sku": "gems"},
        **extra,
    }


def envelope(event: dict[str, Any], destination: str = "x") -> DeliveryEnvelope:
    ev = ConversionEvent.parse(event)
    assert ev.event_id is not None
    return DeliveryEnvelope(
        delivery_id=delivery_id_for(ev.event_id, destination),
        destination=destination,
        kind="x_mact",
        event=ev,
        max_attempts=3,
        created_at=datetime.now(UTC),
    )


def build(adapter: XMactAdapter, event: dict[str, Any]) -> OutgoingRequest:
    request = adapter.build_request(envelope(event))
    assert isinstance(request, OutgoingRequest), request
    return request


def query(request: OutgoingRequest) -> dict[str, str]:
    pairs = parse_qsl(urlsplit(request.url).query, keep_blank_values=True, strict_parsing=True)
    params = dict(pairs)
    assert len(params) == len(pairs), f"a parameter appears twice: {pairs}"
    return params


# --- independent reference computations (no project code) -------------------------------------


def expected_hash(device_id: str, key: bytes = PARTNER_KEY_BYTES) -> str:
    return base64.b64encode(hmac.new(key, device_id.encode(), hashlib.sha256).digest()).decode()


def _pct(value: str) -> str:
    return quote(value, safe="~")  # RFC 5849 3.6: unreserved characters only stay as they are


def oauth_fields(header: str) -> dict[str, str]:
    assert header.startswith("OAuth "), header
    fields: dict[str, str] = {}
    for part in header[len("OAuth ") :].split(","):
        name, _, value = part.strip().partition("=")
        assert value.startswith('"'), part
        assert value.endswith('"'), part
        assert unquote(name) not in fields, f"{name} twice"
        fields[unquote(name)] = unquote(value[1:-1])
    return fields


def expected_signature(method: str, url: str, oauth: dict[str, str], cs: str, ts: str) -> str:
    """RFC 5849 3.4: HMAC-SHA1 over the signature base string, computed here by hand."""
    split = urlsplit(url)
    base_uri = f"{split.scheme.lower()}://{split.netloc.lower()}{split.path}"
    pairs = parse_qsl(split.query, keep_blank_values=True)
    pairs += [(k, v) for k, v in oauth.items() if k not in {"oauth_signature", "realm"}]
    normalized = "&".join(f"{k}={v}" for k, v in sorted((_pct(k), _pct(v)) for k, v in pairs))
    base_string = "&".join((method.upper(), _pct(base_uri), _pct(normalized)))
    key = f"{_pct(cs)}&{_pct(ts)}".encode()
    return base64.b64encode(hmac.new(key, base_string.encode(), hashlib.sha1).digest()).decode()


@pytest.fixture
def sandbox() -> Iterator[SandboxX]:
    with SandboxX(XCredentials(CK, CS, AT, ATS), attribution_share=1.0) as server:
        yield server


def send(request: OutgoingRequest) -> requests.Response:
    with requests.Session() as session:
        return session.request(
            request.method, request.url, headers=request.headers, data=request.body, timeout=10
        )


# --- the exact request -------------------------------------------------------------------------


CASES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "ios-install": (
        ios_event(),
        {
            "app_id": "333903271",
            "conversion_time": "2026-11-22T10:00:00.123Z",
            "conversion_type": "INSTALL",
            "hashed_device_id": expected_hash(IDFA),
            "os_type": "IOS",
            "click_window": "14",
            "view_through_window": "1",
            "device_ip_address": "192.133.78.1",
        },
    ),
    "ios-purchase": (
        ios_event(
            event_id="ios-purchase-1",
            app_id="333903271",
            event_name="af_purchase",
            event_time="2026-11-22T10:00:00Z",
            revenue="12345.678901",
            currency="USD",
            event_values={"af_quantity": "2"},
            ip=None,
        ),
        {
            "app_id": "333903271",
            "conversion_time": "2026-11-22T10:00:00.000Z",
            "conversion_type": "PURCHASE",
            "hashed_device_id": expected_hash(IDFA),
            "os_type": "IOS",
            "click_window": "14",
            "view_through_window": "1",
            "price_micro": "12345678901",
            "price_currency": "USD",
            "number_items": "2",
        },
    ),
    "android-install": (
        android_event(
            event_id="android-install-1",
            event_name="install",
            revenue=None,
            currency=None,
            event_values={},
            android_id=ANDROID_ID,  # the GAID wins when both are there
        ),
        {
            "app_id": "com.example.game",
            "conversion_time": "2026-11-22T10:05:00.500Z",
            "conversion_type": "INSTALL",
            "hashed_device_id": expected_hash(GAID),
            "os_type": "ANDROID",
            "click_window": "14",
            "view_through_window": "1",
            "device_ip_address": "2001:db8::1",
        },
    ),
    "android-purchase": (
        android_event(),
        {
            "app_id": "com.example.game",
            "conversion_time": "2026-11-22T10:05:00.500Z",
            "conversion_type": "PURCHASE",
            "hashed_device_id": expected_hash(GAID),
            "os_type": "ANDROID",
            "click_window": "14",
            "view_through_window": "1",
            "device_ip_address": "2001:db8::1",
            "price_micro": "4990000",
            "price_currency": "EUR",
            "number_items": "3",
            "level": "7",
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_request_for_install_and_purchase_on_ios_and_android(case: str) -> None:
    event, expected = CASES[case]
    before = int(time.time())
    request = build(x_adapter(), event)
    after = int(time.time())

    assert request.method == "POST"
    split = urlsplit(request.url)
    assert (split.scheme, split.netloc, split.path) == (
        "https",
        "ads-api.x.com",
        "/12/conversion_event",
    )
    assert split.fragment == ""
    assert query(request) == expected
    assert request.body is None
    # What gets logged is the same URL (the query holds no secret; OAuth lives in the header).
    assert request.display_url == request.url

    oauth = oauth_fields(request.headers["Authorization"])
    assert set(oauth) == {
        "oauth_consumer_key", "oauth_token", "oauth_signature_method", "oauth_timestamp",
        "oauth_nonce", "oauth_version", "oauth_signature",
    }  # fmt: skip
    assert oauth["oauth_consumer_key"] == CK
    assert oauth["oauth_token"] == AT
    assert oauth["oauth_signature_method"] == "HMAC-SHA1"
    assert oauth["oauth_version"] == "1.0"
    assert before - 1 <= int(oauth["oauth_timestamp"]) <= after + 1
    assert len(oauth["oauth_nonce"]) >= 16
    assert 'oauth_signature_method="HMAC-SHA1"' in request.headers["Authorization"]
    assert 'oauth_version="1.0"' in request.headers["Authorization"]
    assert oauth["oauth_signature"] == expected_signature("POST", request.url, oauth, CS, ATS)

    everything = request.url + json.dumps(request.headers)
    for secret in (CS, ATS, PK):
        assert secret not in everything


def test_every_request_has_its_own_nonce_and_signature() -> None:
    adapter = x_adapter()
    requests_ = [build(adapter, ios_event()) for _ in range(5)]
    nonces = {oauth_fields(r.headers["Authorization"])["oauth_nonce"] for r in requests_}
    assert len(nonces) == 5
    assert len({query(r)["hashed_device_id"] for r in requests_}) == 1


def test_request_carries_the_idempotency_key() -> None:
    env = envelope(ios_event())
    request = x_adapter().build_request(env)
    assert isinstance(request, OutgoingRequest)
    assert request.headers.get("X-Idempotency-Key") == env.delivery_id


def test_api_version_base_url_and_windows_come_from_config() -> None:
    adapter = x_adapter(
        "http://127.0.0.1:8080",
        'api_version = "11"\nclick_window = 30\nview_through_window = 7',
    )
    request = build(adapter, android_event())
    split = urlsplit(request.url)
    assert (split.scheme, split.netloc, split.path) == (
        "http",
        "127.0.0.1:8080",
        "/11/conversion_event",
    )
    params = query(request)
    assert (params["click_window"], params["view_through_window"]) == ("30", "7")
    oauth = oauth_fields(request.headers["Authorization"])
    assert oauth["oauth_signature"] == expected_signature("POST", request.url, oauth, CS, ATS)


@pytest.mark.parametrize(
    ("event_time", "conversion_time"),
    [
        ("2026-11-22T10:00:00.123Z", "2026-11-22T10:00:00.123Z"),
        ("2026-11-22T10:00:00.999999Z", "2026-11-22T10:00:00.999Z"),  # truncated, never 1000
        ("2026-11-22T10:00:00Z", "2026-11-22T10:00:00.000Z"),
        ("2026-11-22T05:30:00.007-04:30", "2026-11-22T10:00:00.007Z"),
        ("2026-11-23T00:59:59.5+01:00", "2026-11-22T23:59:59.500Z"),
    ],
)
def test_conversion_time_is_utc_with_milliseconds(event_time: str, conversion_time: str) -> None:
    params = query(build(x_adapter(), ios_event(event_time=event_time)))
    assert params["conversion_time"] == conversion_time


@pytest.mark.parametrize(
    ("amount", "micros"),
    [
        ("4.99", 4_990_000),
        ("0.000001", 1),
        ("12345.678901", 12_345_678_901),
        ("0", 0),
        ("1", 1_000_000),
        ("19.990000", 19_990_000),
        ("0.1", 100_000),
        ("99999999999999.999999", 99_999_999_999_999_999_999),
    ],
)
def test_price_micro_is_exact(amount: str, micros: int) -> None:
    assert price_micro(Decimal(amount)) == micros
    params = query(build(x_adapter(), android_event(revenue=amount, currency="JPY")))
    assert params["price_micro"] == str(micros)
    assert params["price_currency"] == "JPY"


def test_no_revenue_means_no_price_parameters() -> None:
    params = query(build(x_adapter(), android_event(revenue=None, currency=None)))
    assert "price_micro" not in params
    assert "price_currency" not in params


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (3, "3"),
        ("3", "3"),
        ("007", "7"),
        (0, "0"),
        (2.5, None),
        (True, None),
        ("-1", None),
        (-1, None),
        ("two", None),
        ("", None),
        ([3], None),
        (None, None),
    ],
)
def test_number_items_and_level_come_from_event_values(value: Any, sent: str | None) -> None:
    params = query(
        build(x_adapter(), android_event(event_values={"af_quantity": value, "af_level": value}))
    )
    assert params.get("number_items") == sent
    assert params.get("level") == sent


def test_number_items_and_level_keys_are_configurable() -> None:
    adapter = x_adapter(extra='level_key = "lvl"\nnumber_items_key = "qty"')
    params = query(build(adapter, android_event(event_values={"qty": 4, "lvl": 9, "af_level": 1})))
    assert (params["number_items"], params["level"]) == ("4", "9")


def test_non_decimal_digit_characters_do_not_crash_the_request() -> None:
    request = x_adapter().build_request(envelope(android_event(event_values={"af_quantity": "²"})))
    assert isinstance(request, OutgoingRequest)
    assert "number_items" not in query(request)


# --- signature accepted by oauthlib's server side (SandboxX) -----------------------------------


def test_signed_requests_verify_with_oauthlibs_server_side(sandbox: SandboxX) -> None:
    adapter = x_adapter(sandbox.url)
    answers = [send(build(adapter, event)) for event, _ in CASES.values()]
    assert [a.status_code for a in answers] == [200, 200, 200, 200], [a.text for a in answers]
    assert len(sandbox.requests) == 4
    for got, (_event, expected) in zip(sandbox.requests, CASES.values(), strict=True):
        assert got.method == "POST"
        assert got.path == "/12/conversion_event"
        assert got.params == expected
    body = answers[0].json()
    assert body["data"]["twitter_attribution"]["promoted_properties"]["campaign_id"]
    assert body["data"]["tpn_attribution"] is None
    assert int(answers[0].headers["x-rate-limit-remaining"]) == sandbox.rate_limit - 1


@pytest.mark.parametrize(
    "wrong",
    [
        {"X_CS": "cs-WRONG-secret-000"},
        {"X_ATS": "ats-WRONG-secret-000"},
        {"X_CK": "ck-unknown-consumer"},
    ],
)
def test_wrong_credentials_get_401_unauthorized_access(
    sandbox: SandboxX, wrong: dict[str, str]
) -> None:
    adapter = x_adapter(sandbox.url, environ={**ENV, **wrong})
    response = send(build(adapter, ios_event()))
    assert response.status_code == 401
    assert [e["code"] for e in response.json()["errors"]] == ["UNAUTHORIZED_ACCESS"]
    assert len(sandbox.requests) == 1
    outcome = adapter.classify(HttpAnswer.of(response.status_code, response.headers), response.text)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.status == 401
    assert "UNAUTHORIZED_ACCESS" in outcome.reason
    assert outcome.alarm is True
    assert outcome.pause_seconds is not None
    assert outcome.pause_seconds > 0


def test_a_tampered_query_breaks_the_signature(sandbox: SandboxX) -> None:
    request = build(x_adapter(sandbox.url), ios_event())
    tampered = request.url.replace("conversion_type=INSTALL", "conversion_type=PURCHASE")
    assert tampered != request.url
    response = send(OutgoingRequest("POST", tampered, tampered, request.headers))
    assert response.status_code == 401


def test_replayed_nonce_is_rejected(sandbox: SandboxX) -> None:
    request = build(x_adapter(sandbox.url), ios_event())
    assert send(request).status_code == 200
    assert send(request).status_code == 401
    assert [r.status for r in sandbox.requests] == [200, 401]


# --- hashed_device_id ----------------------------------------------------------------------------


def test_hash_vector_is_44_chars_of_standard_base64() -> None:
    params = query(build(x_adapter(), ios_event()))
    value = params["hashed_device_id"]
    assert len(value) == 44
    assert value.endswith("=")
    assert len(base64.b64decode(value, validate=True)) == 32
    assert value == expected_hash(IDFA)
    # A fixed vector, computed once outside Python (openssl dgst -sha256 -hmac KEY -binary | base64).
    upper = query(build(x_adapter(extra='idfa_case = "upper"'), ios_event()))
    assert upper["hashed_device_id"] == "bTrLMp6IvVEUH7uhQEVLejx0Brmz+il7WpbeoKAjZUk="


@pytest.mark.parametrize(
    ("idfa_case", "hashed_input"),
    [
        (None, IDFA),
        ("as_received", IDFA),
        ("upper", IDFA.upper()),
        ("lower", IDFA.lower()),
    ],
)
def test_idfa_case_setting_changes_the_hashed_input(
    idfa_case: str | None, hashed_input: str
) -> None:
    extra = f'idfa_case = "{idfa_case}"' if idfa_case else ""
    params = query(build(x_adapter(extra=extra), ios_event()))
    assert params["hashed_device_id"] == expected_hash(hashed_input)


def test_the_three_idfa_cases_give_three_different_hashes() -> None:
    hashes = {
        query(build(x_adapter(extra=f'idfa_case = "{c}"'), ios_event()))["hashed_device_id"]
        for c in ("as_received", "upper", "lower")
    }
    assert len(hashes) == 3


def test_idfa_case_does_not_touch_the_gaid() -> None:
    gaid = GAID.upper()
    params = query(build(x_adapter(extra='idfa_case = "lower"'), android_event(gaid=gaid)))
    assert params["hashed_device_id"] == expected_hash(gaid)


def test_android_id_only_is_hashed_as_its_sha1_hex() -> None:
    event = android_event(gaid=None, android_id=ANDROID_ID)
    params = query(build(x_adapter(), event))
    sha1_hex = hashlib.sha1(ANDROID_ID.encode()).hexdigest()  # X's format: sha1(Android ID)
    assert len(sha1_hex) == 40
    assert params["hashed_device_id"] == expected_hash(sha1_hex)
    assert params["hashed_device_id"] != expected_hash(ANDROID_ID)
    assert len(params["hashed_device_id"]) == 44


def test_another_partner_key_gives_another_hash() -> None:
    other_key = b"another-partner-key-of-32-bytes!"
    environ = {**ENV, "X_PK": base64.b64encode(other_key).decode()}
    params = query(build(x_adapter(environ=environ), ios_event()))
    assert params["hashed_device_id"] == expected_hash(IDFA, other_key)
    assert params["hashed_device_id"] != expected_hash(IDFA)


# --- skips and routing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ios_event(idfa=None),
        ios_event(idfa=None, idfv="11111111-2222-3333-4444-555555555555"),
        android_event(gaid=None),
        android_event(gaid=None, oaid="0123456789abcdef0123"),
    ],
    ids=["ios-nothing", "ios-idfv-only", "android-nothing", "android-oaid-only"],
)
def test_no_usable_device_id_is_skipped(event: dict[str, Any]) -> None:
    outcome = x_adapter().build_request(envelope(event))
    assert isinstance(outcome, Skipped)
    assert "device id" in outcome.reason


@pytest.fixture
def pipeline_for(redis_url: str, redis_client: redis.Redis) -> Iterator[Any]:
    clients: list[HttpClient] = []

    def make(destinations: Destinations) -> DeliveryPipeline:
        client = http_client(Settings())
        clients.append(client)
        return DeliveryPipeline(
            destinations=destinations,
            sender=Sender(client),
            limiter=GlobalRateLimiter(redis.Redis.from_url(redis_url), KEYS),
            pauses=PauseRegistry(redis_client, KEYS),
            requeuer=Requeuer(
                redis_client,
                DelaySet(redis_client, KEYS),
                TaskMessageEncoder(Celery("postback_relay", set_as_current=False)),
                DeliveryLedger(redis_client, KEYS, 600),
            ),
            dead_letters=DeadLetterStore(redis_client, KEYS),
            attempts=AttemptLog(redis_client, KEYS, 1000),
            metrics=MetricsRecorder(KEYS),
            redis_client=redis_client,
            keys=KEYS,
        )

    yield make
    for client in clients:
        client.close()


def test_pipeline_records_a_skip_not_an_error(
    pipeline_for: Any, redis_client: redis.Redis, sandbox: SandboxX
) -> None:
    pipeline = pipeline_for(x_destinations(sandbox.url))
    results = [
        pipeline.run(envelope(ios_event(idfa=None))),
        pipeline.run(envelope(android_event(gaid=None))),
    ]
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert all(r.attempt is None for r in results)
    assert sandbox.requests == []
    assert DeadLetterStore(redis_client, KEYS).count() == 0
    assert AttemptLog(redis_client, KEYS, 1000).count() == 0
    assert redis_client.llen(queue_for("x_mact")) == 0
    assert redis_client.zcard(KEYS.delayed(queue_for("x_mact"))) == 0
    counters = redis_client.hgetall(KEYS.metrics_counters())
    assert counters == {b"x|skipped": b"2"}


def test_pipeline_delivers_and_keeps_the_attribution(
    pipeline_for: Any, redis_client: redis.Redis, sandbox: SandboxX
) -> None:
    """The same pipeline a worker runs, in this process: a signed send, 200, attribution kept."""
    pipeline = pipeline_for(x_destinations(sandbox.url))
    result = pipeline.run(envelope(ios_event()))
    assert result.status == "delivered", result
    assert [r.status for r in sandbox.requests] == [200]
    (record,) = list(AttemptLog(redis_client, KEYS, 1000).iter_records())
    assert record["notifying_status"] == "sent"
    attribution = json.loads(record["attribution"])
    assert attribution["twitter_attribution"]["attribution_type"] == "DIRECT"
    assert attribution["tpn_attribution"] is None
    # The sandbox's headers tightened the shared budget: its remaining count minus nothing yet.
    assert int(redis_client.get(KEYS.server_budget("x")) or 0) == sandbox.rate_limit - 1


def routed_names(destinations: Destinations, event: dict[str, Any]) -> list[str]:
    return [d.name for d, _ in destinations.routes_for(ConversionEvent.parse(event))]


def test_events_without_a_conversion_mapping_are_not_routed_to_x() -> None:
    text = (
        x_toml()
        + """
[[destination]]
name = "net"
kind = "templated"
url = "https://pb.example.com/e?n=(event-name)"
[[destination.routes]]
type = "event"
"""
    )
    dests = parse_destinations(tomllib.loads(text))
    assert routed_names(dests, android_event(event_name="af_unknown_thing")) == ["net"]
    assert routed_names(dests, android_event(event_name="af_purchase")) == ["x", "net"]
    assert routed_names(dests, ios_event()) == ["x"]
    for name in DEFAULT_X_CONVERSIONS:
        if name != "install":
            assert "x" in routed_names(dests, android_event(event_name=name)), name


def test_custom_conversion_types_add_to_and_override_the_defaults() -> None:
    adapter = x_adapter(
        extra='conversion_types = { "gems_bought" = "SPENT_CREDITS", "af_purchase" = "CHECKOUT_INITIATED" }'
    )
    dests = Destinations([adapter.destination])
    assert routed_names(dests, android_event(event_name="gems_bought")) == ["x"]
    assert query(build(adapter, android_event(event_name="gems_bought")))["conversion_type"] == (
        "SPENT_CREDITS"
    )
    assert query(build(adapter, android_event()))["conversion_type"] == "CHECKOUT_INITIATED"
    assert query(build(adapter, android_event(event_name="af_login")))["conversion_type"] == "LOGIN"


def test_without_default_conversion_types_only_the_configured_map_applies() -> None:
    adapter = x_adapter(
        extra='use_default_conversion_types = false\nconversion_types = { "install" = "INSTALL", "bought" = "PURCHASE" }'
    )
    dests = Destinations([adapter.destination])
    assert routed_names(dests, ios_event()) == ["x"]
    assert routed_names(dests, android_event(event_name="bought")) == ["x"]
    assert routed_names(dests, android_event(event_name="af_purchase")) == []
    assert routed_names(dests, android_event(event_name="af_login")) == []
    assert (
        query(build(adapter, android_event(event_name="bought")))["conversion_type"] == "PURCHASE"
    )
    skipped = adapter.build_request(envelope(android_event()))
    assert isinstance(skipped, Skipped)
    assert "af_purchase" in skipped.reason


# --- config validation at start-up ---------------------------------------------------------------


def load_file(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Destinations:
    """The file as a worker sees it at start-up: validated, then its secrets read."""
    path = tmp_path / "destinations.toml"
    path.write_text(text)
    return load_destinations(path).with_secrets(ENV if environ is None else environ, kinds=KINDS)


def test_defaults(tmp_path: Path) -> None:
    dest = load_file(tmp_path, x_toml()).get("x")
    assert isinstance(dest, XMactDestination)
    assert dest.base_url == "https://ads-api.x.com"
    assert dest.api_version == "12"
    assert (dest.click_window, dest.view_through_window) == (14, 1)
    assert dest.idfa_case == "as_received"
    assert dest.rate_limit == "60000 per 15 minutes"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("click_window = 7\nview_through_window = 14", "view_through_window"),
        ("click_window = 1\nview_through_window = 7", "view_through_window"),
        ("click_window = 3", "click_window"),
        ("view_through_window = 2", "view_through_window"),
        ('idfa_case = "title"', "idfa_case"),
        ('api_version = "v12"', "api_version"),
        ('conversion_types = { "x" = "BOUGHT" }', "conversion_types"),
    ],
)
def test_bad_x_settings_stop_start_up(tmp_path: Path, extra: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path, x_toml(extra=extra))
    message = str(info.value)
    assert "destination 'x'" in message
    assert f"{field}:" in message or f"{field}." in message


def test_view_through_equal_to_click_window_is_fine(tmp_path: Path) -> None:
    dest = load_file(tmp_path, x_toml(extra="click_window = 7\nview_through_window = 7")).get("x")
    assert isinstance(dest, XMactDestination)
    assert dest.view_through_window == 7


@pytest.mark.parametrize("missing", X_CREDENTIALS)
def test_each_of_the_five_credentials_is_required(tmp_path: Path, missing: str) -> None:
    creds = credentials_toml(tuple(c for c in X_CREDENTIALS if c != missing))
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path, x_toml(creds=creds))
    message = str(info.value)
    assert "destination 'x'" in message
    assert "credentials" in message
    assert f"missing {missing}" in message


@pytest.mark.parametrize("missing", X_CREDENTIALS)
def test_each_credential_must_resolve(tmp_path: Path, missing: str) -> None:
    environ = {k: v for k, v in ENV.items() if k != CREDENTIAL_ENV[missing]}
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path, x_toml(), environ)
    message = str(info.value)
    assert "destination 'x'" in message
    assert f"credentials.{missing}" in message
    for secret in ENV.values():
        assert secret not in message


@pytest.mark.parametrize(
    "base_url",
    [
        "ftp://ads-api.x.com",
        "https://ads-api.x.com/12",
        "ads-api.x.com",
        "https://ads-api.x.com?x=1",
        "https://",
        "https://ads api.x.com",
    ],
)
def test_bad_base_url_stops_start_up(tmp_path: Path, base_url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path, x_toml(base_url))
    message = str(info.value)
    assert "destination 'x'" in message
    assert "base_url" in message


def test_partner_key_that_is_not_base64_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path, x_toml(), {**ENV, "X_PK": "not base64 at all!"})
    assert "partner_key" in str(info.value)


def test_check_config_command_exits_2_naming_destination_and_field(tmp_path: Path) -> None:
    path = tmp_path / "destinations.toml"
    path.write_text(x_toml(extra="click_window = 1\nview_through_window = 7"))
    env = {
        **os.environ,
        **ENV,
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(path),
        "POSTBACK_RELAY_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "postback-relay"), "check-config"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "destination 'x'" in done.stderr
    assert "view_through_window" in done.stderr


def test_x_check_reads_the_secrets_of_its_destination_only(
    tmp_path: Path, sandbox: SandboxX
) -> None:
    path = tmp_path / "destinations.toml"
    other = """
[[destination]]
name = "net"
kind = "templated"
url = "https://net.example/pb?key={credential:key}"
credentials = { key = { env = "NET_KEY_NOT_SET" } }
routes = [{ type = "install" }]
"""
    path.write_text(x_toml(sandbox.url) + other)
    env = {"POSTBACK_RELAY_DESTINATIONS_FILE": str(path), "NET_KEY_NOT_SET": None}
    run = CliRunner().invoke
    args = ["x-check", "-d", "x"]

    checked = run(main, args, input=json.dumps(ios_event()), env={**env, **ENV})
    assert checked.exit_code == 0, checked.output
    (request,) = sandbox.requests
    assert (request.method, request.path, request.status) == (
        "GET",
        "/12/conversion_attribution",
        200,
    )
    assert CS not in checked.output

    refused = run(main, args, input=json.dumps(ios_event()), env={**env, **ENV, "X_CS": None})
    assert refused.exit_code == 2
    assert "destination 'x': credentials.consumer_secret" in refused.output
    assert "X_CS" in refused.output
    assert len(sandbox.requests) == 1


# --- classify ------------------------------------------------------------------------------------


RESET = 2_000_000_000  # far in the future: epoch seconds of 2033


def response(status: int, headers: dict[str, str] | None = None) -> HttpAnswer:
    return HttpAnswer.of(status, headers or {})


def rate(remaining: int, reset: float = RESET) -> dict[str, str]:
    return {"x-rate-limit-limit": "60000", "x-rate-limit-remaining": str(remaining),
            "x-rate-limit-reset": str(int(reset))}  # fmt: skip


TWITTER_ATTRIBUTION = {
    "engagement_type": "CLICK",
    "engagement_time": "2026-11-22T09:58:00.000Z",
    "attribution_type": "DIRECT",
    "country_code": "US",
    "tweet_id": "1234567890",
    "promoted_properties": {
        "campaign_id": "c1",
        "line_item_id": "l1",
        "account_id": "a1",
        "publisher_app_id": None,
        "line_item_objective": "APP_INSTALLS",
        "campaign_name": "winter",
    },
}


def success_body(twitter: Any, tpn: Any = None) -> str:
    return json.dumps(
        {
            "data": {"app_id": "333903271", "twitter_attribution": twitter, "tpn_attribution": tpn},
            "request": {"params": {"app_id": "333903271"}},
        }
    )


def test_classify_200_with_attribution_keeps_it() -> None:
    body = success_body(TWITTER_ATTRIBUTION)
    outcome = x_adapter().classify(response(200, rate(59_000)), body)
    assert outcome == Delivered(
        200,
        body,
        {"twitter_attribution": TWITTER_ATTRIBUTION, "tpn_attribution": None},
        RateBudget(59_000, float(RESET)),
    )


def test_classify_200_with_null_attribution() -> None:
    body = success_body(None, {"tpn": 1})
    outcome = x_adapter().classify(response(200), body)
    assert isinstance(outcome, Delivered)
    assert outcome.attribution == {"twitter_attribution": None, "tpn_attribution": {"tpn": 1}}
    assert outcome.budget is None


def test_classify_200_with_a_body_that_is_not_json_is_still_delivered() -> None:
    outcome = x_adapter().classify(response(200), "<html>ok</html>")
    assert isinstance(outcome, Delivered)
    assert outcome.status == 200
    assert outcome.attribution is None


def test_classify_400_invalid_parameter_names_code_and_parameter() -> None:
    body = json.dumps(
        {
            "errors": [
                {
                    "code": "INVALID_PARAMETER",
                    "message": "hashed_device_id must be a 44-char base64 HMAC",
                    "parameter": "hashed_device_id",
                }
            ],
            "request": {"params": {}},
        }
    )
    outcome = x_adapter().classify(response(400, rate(10)), body)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.status == 400
    assert "INVALID_PARAMETER" in outcome.reason
    assert "hashed_device_id" in outcome.reason
    assert outcome.reason.startswith("HTTP 400")
    assert outcome.alarm is False
    assert not outcome.pause_seconds
    assert outcome.body_excerpt == body
    assert outcome.budget == RateBudget(10, float(RESET))


def test_classify_400_from_the_sandbox_names_the_missing_parameter(sandbox: SandboxX) -> None:
    adapter = x_adapter(sandbox.url)
    request = build(adapter, ios_event())
    # Drop app_id from the query and re-sign, as a buggy build would send it.
    params = {k: v for k, v in query(request).items() if k != "app_id"}
    resigned = adapter._signed("POST", "conversion_event", params)
    answer = send(resigned)
    assert answer.status_code == 400
    outcome = adapter.classify(HttpAnswer.of(answer.status_code, answer.headers), answer.text)
    assert isinstance(outcome, PermanentFailure)
    assert "MISSING_PARAMETER (app_id)" in outcome.reason


def test_classify_401_is_permanent_with_alarm_and_pause() -> None:
    body = json.dumps({"errors": [{"code": "UNAUTHORIZED_ACCESS", "message": "not authed"}]})
    outcome = x_adapter().classify(response(401, rate(5)), body)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.status == 401
    assert "UNAUTHORIZED_ACCESS" in outcome.reason
    assert outcome.alarm is True
    assert outcome.pause_seconds is not None
    assert outcome.pause_seconds > 0
    assert outcome.budget == RateBudget(5, float(RESET))


def test_classify_403_is_permanent_with_alarm() -> None:
    body = json.dumps(
        {"errors": [{"code": "UNAUTHORIZED_CLIENT_APPLICATION", "message": "not allowed"}]}
    )
    outcome = x_adapter().classify(response(403), body)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.alarm is True
    assert "UNAUTHORIZED_CLIENT_APPLICATION" in outcome.reason


def test_classify_404_html_body_uses_the_status() -> None:
    html = "<html><body>Sorry, that page does not exist</body></html>"
    outcome = x_adapter().classify(response(404, rate(7)), html)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.reason == "HTTP 404"
    assert outcome.alarm is False
    assert outcome.body_excerpt == html
    assert outcome.budget == RateBudget(7, float(RESET))


def test_classify_404_json_names_the_x_code() -> None:
    body = json.dumps({"errors": [{"code": "MACT_APP_NOT_FOUND", "message": "no such app"}]})
    outcome = x_adapter().classify(response(404), body)
    assert isinstance(outcome, PermanentFailure)
    assert outcome.reason == "HTTP 404 MACT_APP_NOT_FOUND: no such app"


def test_classify_429_waits_until_the_reset_and_carries_the_budget() -> None:
    reset = int(time.time()) + 120
    body = json.dumps({"errors": [{"code": "TOO_MANY_REQUESTS", "message": "slow down"}]})
    outcome = x_adapter().classify(response(429, rate(0, reset)), body)
    assert isinstance(outcome, RetryLater)
    assert outcome.status == 429
    assert "TOO_MANY_REQUESTS" in outcome.reason
    assert outcome.after is not None
    assert reset - time.time() - 5 <= outcome.after <= reset - time.time() + 1
    assert outcome.budget == RateBudget(0, float(reset))


def test_classify_429_retry_after_wins_over_the_reset_header() -> None:
    outcome = x_adapter().classify(
        response(429, {**rate(0, int(time.time()) + 600), "Retry-After": "30"}), ""
    )
    assert isinstance(outcome, RetryLater)
    assert outcome.after == 30.0


def test_classify_429_without_any_hint_has_no_wait() -> None:
    outcome = x_adapter().classify(response(429), "")
    assert isinstance(outcome, RetryLater)
    assert outcome.after is None
    assert outcome.budget is None


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "INTERNAL_ERROR"), (503, "SERVICE_UNAVAILABLE"), (503, "OVER_CAPACITY"), (502, None)],
)
def test_classify_5xx_retries(status: int, code: str | None) -> None:
    body = json.dumps({"errors": [{"code": code, "message": "x"}]}) if code else "Bad Gateway"
    outcome = x_adapter().classify(response(status, rate(100)), body)
    assert isinstance(outcome, RetryLater)
    assert outcome.status == status
    assert outcome.reason.startswith(f"HTTP {status}")
    if code:
        assert code in outcome.reason
    assert outcome.budget == RateBudget(100, float(RESET))


@pytest.mark.parametrize("status", [408, 425])
def test_classify_408_and_425_retry(status: int) -> None:
    outcome = x_adapter().classify(response(status), "")
    assert isinstance(outcome, RetryLater)


def test_classify_503_keeps_retry_after() -> None:
    outcome = x_adapter().classify(response(503, {"Retry-After": "30"}), "")
    assert isinstance(outcome, RetryLater)
    assert outcome.after == 30.0


@pytest.mark.parametrize("status", [200, 201, 400, 401, 403, 404, 429, 500, 503])
def test_rate_limit_headers_give_a_budget_on_every_outcome(status: int) -> None:
    outcome = x_adapter().classify(response(status, rate(42)), "{}")
    assert getattr(outcome, "budget", None) == RateBudget(42, float(RESET))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-rate-limit-remaining": "5"},
        {"x-rate-limit-reset": str(RESET)},
        {"x-rate-limit-remaining": "lots", "x-rate-limit-reset": str(RESET)},
    ],
)
def test_incomplete_rate_limit_headers_give_no_budget(headers: dict[str, str]) -> None:
    outcome = x_adapter().classify(response(200, headers), "{}")
    assert isinstance(outcome, Delivered)
    assert outcome.budget is None


# --- the server-announced budget in Redis --------------------------------------------------------


def wait_of(reservation: Reservation | None) -> float:
    assert reservation is not None
    return reservation.wait


@pytest.mark.usefixtures("redis_client")
def test_tightened_budget_denies_the_third_send_until_the_reset(redis_url: str) -> None:
    limiter = GlobalRateLimiter(redis.Redis.from_url(redis_url), KEYS)
    reset_at = time.time() + 2
    limiter.tighten("x", 2, reset_at)
    big = limits.parse("60000 per 15 minutes")  # the x_mact default: never the binding limit
    assert wait_of(limiter.reserve("x", big, server_budget=True)) < 0.1
    assert wait_of(limiter.reserve("x", big, server_budget=True)) < 0.1
    third = limiter.reserve("x", big, server_budget=True)
    assert third is not None
    assert 0 < third.wait <= 2.0
    assert third.send_at >= reset_at - 0.01  # not before the partner's reset
    fourth = limiter.reserve("x", big, server_budget=True)
    assert fourth is not None
    assert fourth.send_at > third.send_at >= reset_at - 0.01  # still denied; then spaced out
    # Other destinations, and callers that do not use the server budget, are unaffected.
    assert wait_of(limiter.reserve("y", big, server_budget=True)) == 0
    assert limiter.reserve("x", None, server_budget=False) is None
    # A send under x's own limit queues behind those waiting for the reset: one schedule per
    # limit key, so the sends held back by the budget do not all go at once when it resets.
    assert wait_of(limiter.reserve("x", big, server_budget=False)) > 0
    # After the partner's reset the budget is gone and sends are granted again.
    time.sleep(max(0.0, fourth.send_at - limiter.now()) + 0.1)
    assert wait_of(limiter.reserve("x", big, server_budget=True)) == 0
    assert time.time() >= reset_at - 0.05


@pytest.mark.usefixtures("redis_client")
def test_tighten_with_a_past_reset_changes_nothing_and_a_new_window_replaces_the_budget(
    redis_url: str,
) -> None:
    limiter = GlobalRateLimiter(redis.Redis.from_url(redis_url), KEYS)
    limiter.tighten("x", 0, time.time() - 1)
    assert wait_of(limiter.reserve("x", None, server_budget=True)) == 0
    assert limiter.redis.exists(KEYS.server_budget("x")) == 0
    limiter.tighten("x", 0, time.time() + 30)
    wait = wait_of(limiter.reserve("x", None, server_budget=True))
    assert 25 < wait <= 30
    # The partner's next window (a later reset) starts with a fresh count.
    limiter.tighten("x", 1, time.time() + 60)
    assert wait_of(limiter.reserve("x", None, server_budget=True)) == 0
    wait = wait_of(limiter.reserve("x", None, server_budget=True))
    assert 55 < wait <= 60
    limiter.tighten("x", -5, time.time() + 90)  # never negative in Redis
    assert limiter.redis.get(KEYS.server_budget("x")) == b"0"


@pytest.mark.usefixtures("redis_client")
def test_a_late_answer_in_the_same_window_does_not_raise_the_budget(redis_url: str) -> None:
    limiter = GlobalRateLimiter(redis.Redis.from_url(redis_url), KEYS)
    reset_at = time.time() + 30
    limiter.tighten("x", 1, reset_at)  # answer to request k: one left
    assert wait_of(limiter.reserve("x", None, server_budget=True)) == 0  # k+1 takes it
    limiter.tighten("x", 1, reset_at)  # a reply from before k+1 reached X arrives late
    assert wait_of(limiter.reserve("x", None, server_budget=True)) > 25
