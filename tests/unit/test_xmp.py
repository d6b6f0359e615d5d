"""The XMP destination without worker processes: record keys (dates in the destination's
timezone, channels, the 90-day rule, XMP's field lengths, request_id), exact totals in real
Redis (micros, HyperLogLog unique users, event-id dedupe, versioned dirty set) and the flusher
against an in-process SandboxXmp (batches of <= 200, bisection on 400, pause and alarms on 401
through the shared code, a failed send leaves the keys dirty for the next flush and never
sleeps, one flush at a time, aged records dead-lettered).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from celery import Celery

from config.destination_base import ConfigError
from config.destinations import load_destinations, parse_destinations
from config.keys import RedisKeys
from config.kinds.xmp import DEFAULT_XMP_CHANNEL_MAP, XMP_CHANNELS, XmpDestination
from config.settings import Settings
from producers.produce import Producer
from schemas.envelope import delivery_id_for
from schemas.event import ConversionEvent
from schemas.outcomes import Outcome, PermanentFailure
from workers.broker.wire import TaskMessageEncoder
from workers.delivery.client import HttpClient, http_client
from workers.delivery.effects import OutcomeEffects
from workers.delivery.pipeline import DeliveryPipeline
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.delivery.sender import Sender
from workers.kinds.xmp.adapter import dumps_exact
from workers.kinds.xmp.aggregate import RecordKey, XmpAggregator, XmpReject, record_key_for
from workers.kinds.xmp.flush import FlushReport, XmpFlusher
from workers.kinds.xmp.sandbox import SandboxXmp
from workers.metrics import MetricsRecorder
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger
from workers.stores.requeue import Requeuer

KEYS = RedisKeys("pr")
TOKEN = "xmp-token-5e1f0c9a7b"
APP = "com.example.game"
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"
# A fixed "now" for the pure record-key tests (the flush tests use the real clock, because the
# sandbox checks active_date against today).
NOW = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)
EVENT_AT = "2026-11-22T20:00:00Z"  # 2026-11-23 in UTC+8, 2026-11-22 in UTC-5
INSTALL_AT = "2026-11-21T17:00:00Z"  # 2026-11-22 in UTC+8, 2026-11-21 in UTC-5


def xmp_dest(
    url: str = "http://127.0.0.1:9/s2s/postback/v2", token: str = TOKEN, **fields: Any
) -> XmpDestination:
    entry: dict[str, Any] = {
        "name": "xmp",
        "kind": "xmp",
        "url": url,
        "timezone": "UTC+8",
        "credentials": {"xmp_token": {"env": "XMP_TOKEN"}},
        "routes": [{"type": "install"}, {"type": "event"}],
        "retry": {"max_attempts": 2, "schedule": [10, 20], "jitter": 0},
        **fields,
    }
    dest = (
        parse_destinations({"destination": [entry]})
        .with_secrets({"XMP_TOKEN": token}, kinds=["xmp"])
        .get("xmp")
    )
    assert isinstance(dest, XmpDestination)
    return dest


def event(**fields: Any) -> ConversionEvent:
    data: dict[str, Any] = {
        "event_id": f"ev-{uuid.uuid4().hex}",
        "app_id": APP,
        "platform": "android",
        "event_name": "af_purchase",
        "event_time": EVENT_AT,
        "install_time": INSTALL_AT,
        "gaid": GAID,
        "media_source": "applovin_int",
        "campaign_id": "c1",
        "adset_id": "as1",
        "ad_id": "ad1",
        "country": "US",
    }
    data.update(fields)
    return ConversionEvent.parse({k: v for k, v in data.items() if v is not None})


def live_event(now: datetime, **fields: Any) -> ConversionEvent:
    """An event of yesterday by an install of two days ago: inside XMP's 90-day window."""
    times = {
        "event_time": (now - timedelta(days=1)).isoformat(),
        "install_time": (now - timedelta(days=2)).isoformat(),
    }
    return event(**{**times, **fields})


@pytest.fixture
def sandbox() -> Iterator[SandboxXmp]:
    with SandboxXmp(token=TOKEN) as server:
        yield server


# Every time.sleep() the test's own thread makes: a flush must never wait in its task.
SLEEPS: list[float] = []


@pytest.fixture(autouse=True)
def count_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    SLEEPS.clear()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if threading.current_thread() is threading.main_thread():
            SLEEPS.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)


class Harness:
    """An aggregator and a flusher on the test's Redis, sending with a worker's HTTP client."""

    def __init__(self, client: redis.Redis, http: HttpClient | None = None) -> None:
        self.redis = client
        self.sleeps = SLEEPS
        self.dead_letters = DeadLetterStore(client, KEYS)
        self.pauses = PauseRegistry(client, KEYS)
        self.attempts = AttemptLog(client, KEYS, 10_000)
        self.aggregator = XmpAggregator(client, KEYS)
        self.flusher = XmpFlusher(
            client,
            KEYS,
            Sender(http or http_client(Settings())),
            dead_letters=self.dead_letters,
            pauses=self.pauses,
            attempts=self.attempts,
        )

    def dirty(self, dest: XmpDestination) -> set[str]:
        members: list[bytes] = self.redis.zrange(KEYS.xmp_dirty(dest.name), 0, -1)  # type: ignore[assignment]
        return {m.decode() for m in members}


@pytest.fixture
def harness(redis_client: redis.Redis) -> Harness:
    return Harness(redis_client)


# --------------------------------------------------------------------------- configuration


def test_the_briefs_toml_loads_as_an_xmp_destination_with_xmps_limits(
    write_destinations: Callable[[str], Path],
) -> None:
    path = write_destinations(
        """
[[destination]]
name = "xmp"
kind = "xmp"
url = "http://127.0.0.1:8080/s2s/postback/v2"
timezone = "UTC+8"
credentials = { xmp_token = { env = "XMP_TOKEN" } }
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"
"""
    )
    dest = load_destinations(path).with_secrets({"XMP_TOKEN": TOKEN}, kinds=["xmp"]).get("xmp")
    assert isinstance(dest, XmpDestination)
    assert dest.secret("xmp_token") == TOKEN
    assert dest.utc_offset_hours == 8
    assert dest.batch_size == 200
    # vendor advice: retry up to 2 times within a minute
    assert dest.retry.max_attempts == 2
    assert dest.retry.schedule == [10, 20]
    assert TOKEN not in repr(dest)


def test_config_rejects_a_channel_map_to_a_non_xmp_channel_and_a_missing_token() -> None:
    with pytest.raises(ConfigError, match=r"channel_map\.fb.*'facebook' is not an XMP channel"):
        xmp_dest(channel_map={"fb": "facebook"})
    with pytest.raises(ConfigError, match="xmp needs xmp_token"):
        xmp_dest(credentials={})
    with pytest.raises(ConfigError, match="timezone"):
        xmp_dest(timezone="UTC+13")
    with pytest.raises(ConfigError, match="batch_size"):
        xmp_dest(batch_size=201)


# --------------------------------------------------------------------------- record keys


@pytest.mark.parametrize(
    ("tz", "event_date", "active_date"),
    [
        ("UTC+8", "2026-11-23", "2026-11-22"),
        ("UTC-5", "2026-11-22", "2026-11-21"),
        ("UTC+0", "2026-11-22", "2026-11-21"),
        ("UTC+12", "2026-11-23", "2026-11-22"),
    ],
)
def test_event_date_and_active_date_are_days_in_the_destinations_timezone(
    tz: str, event_date: str, active_date: str
) -> None:
    key = record_key_for(xmp_dest(timezone=tz), event(), NOW)
    assert (key.event_date, key.active_date) == (event_date, active_date)
    assert key.timezone is None  # not sent unless include_timezone


def test_an_install_without_install_time_takes_its_active_date_from_event_time() -> None:
    key = record_key_for(
        xmp_dest(), event(event_name="install", install_time=None, event_id="i-1"), NOW
    )
    assert key.event_name == "install"
    assert key.event_date == key.active_date == "2026-11-23"


def test_a_non_install_without_install_time_is_rejected_naming_active_date() -> None:
    with pytest.raises(XmpReject, match=r"^active_date: .*install_time"):
        record_key_for(xmp_dest(), event(install_time=None), NOW)


def test_unknown_country_is_a_single_space() -> None:
    key = record_key_for(xmp_dest(), event(country=None), NOW)
    assert key.country == " "
    assert key.dims()["country"] == " "
    assert record_key_for(xmp_dest(), event(country="de"), NOW).country == "DE"


@pytest.mark.parametrize(
    ("media_source", "channel"),
    [
        ("applovin_int", "applovin"),
        ("tiktokglobal_int", "tiktok"),
        ("Apple Search Ads", "apple"),
        ("liftoff_int", "vungle"),
        *[(c, c) for c in XMP_CHANNELS],  # already a channel name
        (None, "organic"),
    ],
)
def test_media_source_maps_to_an_xmp_channel(media_source: str | None, channel: str) -> None:
    assert record_key_for(xmp_dest(), event(media_source=media_source), NOW).channel == channel


def test_every_default_mapping_targets_an_xmp_channel() -> None:
    assert set(DEFAULT_XMP_CHANNEL_MAP.values()) <= set(XMP_CHANNELS)
    dest = xmp_dest()
    for source, channel in DEFAULT_XMP_CHANNEL_MAP.items():
        assert record_key_for(dest, event(media_source=source), NOW).channel == channel


def test_an_unknown_media_source_is_rejected_naming_channel() -> None:
    with pytest.raises(XmpReject, match=r"^channel: media source 'facebook_ads' .*channel_map"):
        record_key_for(xmp_dest(), event(media_source="facebook_ads"), NOW)


def test_channel_map_adds_and_overrides_mappings_and_extra_channels_are_accepted() -> None:
    dest = xmp_dest(
        channel_map={"facebook_ads": "unity", "applovin_int": "mintegral", "snap": "snapchat"},
        extra_channels=["snapchat"],
    )
    assert record_key_for(dest, event(media_source="facebook_ads"), NOW).channel == "unity"
    assert record_key_for(dest, event(media_source="applovin_int"), NOW).channel == "mintegral"
    assert record_key_for(dest, event(media_source="snap"), NOW).channel == "snapchat"
    assert record_key_for(dest, event(media_source="snapchat"), NOW).channel == "snapchat"
    # the defaults that were not overridden still apply
    assert record_key_for(dest, event(media_source="unityads_int"), NOW).channel == "unity"


def test_active_date_must_be_within_the_last_90_days_in_the_destinations_timezone() -> None:
    dest = xmp_dest(timezone="UTC+0")
    today = NOW.date()
    oldest_ok = today - timedelta(days=90)
    ok = record_key_for(dest, event(install_time=f"{oldest_ok}T12:00:00Z"), NOW)
    assert ok.active_date == oldest_ok.isoformat()
    too_old = oldest_ok - timedelta(days=1)
    with pytest.raises(XmpReject, match=rf"^active_date: {too_old} is older than 90 days"):
        record_key_for(dest, event(install_time=f"{too_old}T12:00:00Z"), NOW)
    # An install at 20:00 UTC of the 91st day back is already the 90th day back in UTC+8.
    install = f"{too_old}T20:00:00Z"
    assert record_key_for(xmp_dest(timezone="UTC+8"), event(install_time=install), NOW)
    with pytest.raises(XmpReject, match="active_date"):
        record_key_for(xmp_dest(timezone="UTC-5"), event(install_time=install), NOW)


@pytest.mark.parametrize(
    ("field", "event_field", "limit"),
    [
        ("campaign_id", "campaign_id", 64),
        ("adset_id", "adset_id", 64),
        ("ad_id", "ad_id", 64),
        ("event_name", "event_name", 64),
    ],
)
def test_fields_longer_than_xmp_allows_are_rejected_naming_the_field(
    field: str, event_field: str, limit: int
) -> None:
    dest = xmp_dest()
    at_limit = record_key_for(dest, event(**{event_field: "x" * limit}), NOW)
    assert len(getattr(at_limit, field)) == limit
    with pytest.raises(XmpReject, match=rf"^{field}: longer than XMP's {limit} characters"):
        record_key_for(dest, event(**{event_field: "x" * (limit + 1)}), NOW)


def test_app_id_and_subsource_id_longer_than_128_are_rejected() -> None:
    long_app = "com." + "a" * 125  # 129 characters
    with pytest.raises(XmpReject, match=r"^app_id: longer than XMP's 128"):
        record_key_for(xmp_dest(), event(app_id=long_app), NOW)
    dest = xmp_dest(include_subsource=True)
    assert record_key_for(dest, event(site_id="s" * 128), NOW).subsource_id == "s" * 128
    with pytest.raises(XmpReject, match=r"^subsource_id: longer than XMP's 128"):
        record_key_for(dest, event(site_id="s" * 129), NOW)


def test_request_id_is_the_seeds_concatenation() -> None:
    key = record_key_for(xmp_dest(), event(), NOW)
    # {channel}_{campaign_id}_{adset_id}_{ad_id}_{country}_{event_name}_{event_date}_
    # {active_date}_{app_id}, dates as yyyymmdd like the seed's example
    assert key.request_id == f"applovin_c1_as1_ad1_US_af_purchase_20261123_20261122_{APP}"
    organic = record_key_for(
        xmp_dest(), event(media_source=None, campaign_id=None, country=None), NOW
    )
    assert organic.request_id == f"organic__as1_ad1_ _af_purchase_20261123_20261122_{APP}"


def test_request_id_longer_than_128_characters_is_its_sha256_hex() -> None:
    dest = xmp_dest()
    base = record_key_for(dest, event(campaign_id="c"), NOW).request_id
    pad = 128 - len(base) + 1  # campaign id length that makes the join exactly 128
    exact = record_key_for(dest, event(campaign_id="c" * pad), NOW)
    assert len(exact.request_id) == 128
    assert exact.request_id.startswith("applovin_" + "c" * pad + "_")

    longer = record_key_for(dest, event(campaign_id="c" * (pad + 1)), NOW)
    joined = "_".join(
        [
            "applovin",
            "c" * (pad + 1),
            "as1",
            "ad1",
            "US",
            "af_purchase",
            "20261123",
            "20261122",
            APP,
        ]
    )
    assert len(joined) == 129
    assert longer.request_id == hashlib.sha256(joined.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", longer.request_id)
    # different dimensions, different hashes
    other = record_key_for(dest, event(campaign_id="d" * (pad + 1)), NOW)
    assert other.request_id != longer.request_id


def test_include_timezone_and_include_subsource_add_fields_and_request_id_parts() -> None:
    plain = record_key_for(xmp_dest(), event(site_id="site-42"), NOW)
    assert "timezone" not in plain.dims()
    assert "subsource_id" not in plain.dims()

    dest = xmp_dest(include_timezone=True, include_subsource=True)
    key = record_key_for(dest, event(site_id="site-42"), NOW)
    assert key.dims()["timezone"] == "UTC+8"
    assert key.dims()["subsource_id"] == "site-42"
    assert key.request_id == plain.request_id + "_site-42_UTC+8"

    only_tz = record_key_for(xmp_dest(include_timezone=True), event(), NOW)
    assert only_tz.dims()["timezone"] == "UTC+8"
    assert "subsource_id" not in only_tz.dims()
    assert only_tz.request_id == plain.request_id + "_UTC+8"


def test_record_key_is_a_frozen_value_with_the_seeds_dims() -> None:
    key = RecordKey("organic", "1", "2", "3", "US", "e", "2026-01-02", "2026-01-01", APP)
    assert key.dims() == {
        "channel": "organic", "campaign_id": "1", "adset_id": "2", "ad_id": "3",
        "country": "US", "event_name": "e", "event_date": "2026-01-02",
        "active_date": "2026-01-01", "app_id": APP,
    }  # fmt: skip
    assert key.request_id == f"organic_1_2_3_US_e_20260102_20260101_{APP}"


# --------------------------------------------------------------------------- exact JSON


def test_dumps_exact_keeps_20_digit_decimals_exact() -> None:
    body = {
        "a": Decimal("12345678901234.123456"),
        "b": Decimal("99999999999999.999999"),
        "c": Decimal("-0.000001"),
        "d": Decimal("0.000000"),
        "n": 7,
        "s": "text with 1.5 inside",
        "nested": [{"v": Decimal("0.100000")}],
    }
    out = dumps_exact(body)
    assert isinstance(out, bytes)
    text = out.decode()
    assert '"a":12345678901234.123456' in text
    assert '"b":99999999999999.999999' in text
    assert '"c":-0.000001' in text
    assert '"d":0.000000' in text
    assert '"v":0.100000' in text
    assert "__decimal_" not in text
    assert json.loads(out, parse_float=Decimal) == body
    # what going through float would have done
    assert Decimal(repr(float(Decimal("99999999999999.999999")))) != Decimal(
        "99999999999999.999999"
    )
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        dumps_exact({"x": object()})


# --------------------------------------------------------------------------- totals


@pytest.mark.timeout(90)
def test_10000_events_arrive_as_exact_totals(harness: Harness, sandbox: SandboxXmp) -> None:
    dest = xmp_dest(sandbox.url)
    rng = random.Random(20261122)
    now = datetime.now(UTC)
    tz = timezone(timedelta(hours=8))
    event_day = now.astimezone(tz).date() - timedelta(days=1)
    event_time = datetime(event_day.year, event_day.month, event_day.day, 12, tzinfo=tz)
    devices = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(3000)]
    campaigns = ["c-100", "c-200", "c-300"]
    names = ["af_purchase", "ad_view"]
    install_days = [0, 3, 7]

    count: dict[str, int] = defaultdict(int)
    revenue: dict[str, Decimal] = defaultdict(Decimal)
    users: dict[str, set[str]] = defaultdict(set)
    for number in range(10_000):
        campaign, name, days = rng.choice(campaigns), rng.choice(names), rng.choice(install_days)
        device = rng.choice(devices)
        amount = Decimal(rng.randint(0, 250_000_000)).scaleb(-6)  # 0 .. 250 USD, 6 decimals
        ev = event(
            event_id=f"bulk-{number}",
            event_name=name,
            campaign_id=campaign,
            event_time=event_time.isoformat(),
            install_time=(event_time - timedelta(days=days, hours=1)).isoformat(),
            gaid=device,
            revenue_usd=format(amount, "f"),
            revenue=format(amount, "f"),
            currency="USD",
        )
        rid = record_key_for(dest, ev, now).request_id
        assert harness.aggregator.add(dest, ev, now) is True
        count[rid] += 1
        revenue[rid] += amount
        users[rid].add(device)

    assert len(count) == 18  # 3 campaigns x 2 event names x 3 install days
    assert harness.dirty(dest) == set(count)
    report = harness.flusher.flush(dest)
    assert (report.records, report.sent, report.requests) == (18, 18, 1)
    assert report.failed is None
    assert report.dead_lettered == {}
    assert len(report.batch_ids) == 1
    assert harness.dirty(dest) == set()

    assert set(sandbox.totals) == set(count)
    assert sum(r["event_count"] for r in sandbox.totals.values()) == 10_000
    for rid, record in sandbox.totals.items():
        assert record["event_count"] == count[rid]
        assert isinstance(record["event_revenue_usd"], Decimal)  # sent as a JSON number
        assert record["event_revenue_usd"] == revenue[rid], rid
        assert record["event_value"] == revenue[rid], rid
        true_users = len(users[rid])
        assert abs(record["event_unique_users"] - true_users) <= 0.03 * true_users, (
            rid,
            record["event_unique_users"],
            true_users,
        )
        assert record["event_date"] == event_day.isoformat()
        assert record["channel"] == "applovin"
        assert record["app_id"] == APP
    assert sum(r["event_revenue_usd"] for r in sandbox.totals.values()) == sum(revenue.values())

    # the batch id XMP answered is kept with the attempt
    (logged,) = list(harness.attempts.iter_records())
    assert logged["batch_id"] == report.batch_ids[0]
    assert logged["records"] == "18"
    assert logged["notifying_status"] == "sent"
    assert TOKEN not in json.dumps(logged)


def test_large_revenue_totals_arrive_exact_to_the_micro(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    amounts = [
        Decimal("1234567890123.456789"),
        Decimal("2000000000000.000001"),
        Decimal("0.000001"),
    ]
    for number, amount in enumerate(amounts):
        ev = live_event(now, event_id=f"big-{number}", revenue_usd=format(amount, "f"))
        assert harness.aggregator.add(dest, ev, now)
    report = harness.flusher.flush(dest)
    assert report.sent == 1
    (record,) = sandbox.totals.values()
    assert record["event_revenue_usd"] == Decimal("3234567890123.456791")
    assert record["event_count"] == 3
    assert record["event_unique_users"] == 1


def test_the_largest_numeric_20_6_revenue_is_counted_exactly(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    ev = live_event(now, event_id="huge-1", revenue_usd="99999999999999.999999")
    assert harness.aggregator.add(dest, ev, now) is True
    report = harness.flusher.flush(dest)
    assert report.sent == 1
    (record,) = sandbox.totals.values()
    assert record["event_count"] == 1
    assert record["event_revenue_usd"] == Decimal("99999999999999.999999")


def test_an_event_delivered_twice_is_counted_once(harness: Harness, sandbox: SandboxXmp) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    first = live_event(now, event_id="twice-1", revenue_usd="1.250000")
    assert harness.aggregator.add(dest, first, now) is True
    assert harness.aggregator.add(dest, first, now) is False
    # same event id, other content (a producer's retry that changed): still the first one counts
    again = live_event(now, event_id="twice-1", revenue_usd="9.000000")
    assert harness.aggregator.add(dest, again, now) is False
    other = live_event(now, event_id="twice-2", revenue_usd="0.750000", gaid=str(uuid.uuid4()))
    assert harness.aggregator.add(dest, other, now) is True

    report = harness.flusher.flush(dest)
    assert (report.sent, report.requests) == (1, 1)
    (record,) = sandbox.totals.values()
    assert record["event_count"] == 2
    assert record["event_revenue_usd"] == Decimal("2.000000")
    assert record["event_unique_users"] == 2


def test_a_late_event_corrects_the_total_under_the_same_request_id(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    for number in range(5):
        ev = live_event(now, event_id=f"day-{number}", revenue_usd="2.000000")
        assert harness.aggregator.add(dest, ev, now)
    first = harness.flusher.flush(dest)
    assert first.sent == 1
    (rid,) = sandbox.totals
    assert sandbox.totals[rid]["event_count"] == 5
    assert harness.dirty(dest) == set()

    # nothing changed: nothing to send
    idle = harness.flusher.flush(dest)
    assert (idle.records, idle.requests) == (0, 0)

    late = live_event(now, event_id="day-late", revenue_usd="0.500000", gaid=str(uuid.uuid4()))
    assert harness.aggregator.add(dest, late, now)
    assert harness.dirty(dest) == {rid}
    second = harness.flusher.flush(dest)
    assert (second.sent, second.requests) == (1, 1)

    assert len(sandbox.requests) == 2
    sent_ids = [[r["request_id"] for r in body["data"]] for body in sandbox.requests]
    assert sent_ids == [[rid], [rid]]
    assert [body["data"][0]["event_count"] for body in sandbox.requests] == [5, 6]
    # the stored total is corrected, not doubled
    assert list(sandbox.totals) == [rid]
    assert sandbox.totals[rid]["event_count"] == 6
    assert sandbox.totals[rid]["event_revenue_usd"] == Decimal("10.500000")
    assert sandbox.totals[rid]["event_unique_users"] == 2


def test_450_dirty_keys_go_out_as_200_200_50(harness: Harness, sandbox: SandboxXmp) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    for number in range(450):
        ev = live_event(now, event_id=f"k-{number}", campaign_id=f"camp-{number:03d}")
        assert harness.aggregator.add(dest, ev, now)
    assert len(harness.dirty(dest)) == 450

    report = harness.flusher.flush(dest)
    assert (report.records, report.sent, report.requests) == (450, 450, 3)
    assert len(report.batch_ids) == 3
    assert [len(body["data"]) for body in sandbox.requests] == [200, 200, 50]
    for body in sandbox.requests:
        assert body["xmp_token"] == TOKEN
        assert body["activity_kind"] == "in-app-event-agg"
    sent = [r["request_id"] for body in sandbox.requests for r in body["data"]]
    assert len(sent) == len(set(sent)) == 450
    assert len(sandbox.totals) == 450
    assert {r["campaign_id"] for r in sandbox.totals.values()} == {
        f"camp-{n:03d}" for n in range(450)
    }
    assert harness.dirty(dest) == set()
    assert len(list(harness.attempts.iter_records())) == 3


def _bisect_requests(size: int, bad: int) -> int:
    """Requests a batch of ``size`` with one rejected record at ``bad`` takes to settle."""
    if size == 1:
        return 1
    middle = size // 2
    if bad < middle:
        return 1 + _bisect_requests(middle, bad) + 1
    return 1 + 1 + _bisect_requests(size - middle, bad - middle)


def test_one_bad_record_is_isolated_by_bisection_and_dead_lettered(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    for number in range(200):
        ev = live_event(now, event_id=f"b-{number}", campaign_id=f"camp-{number:03d}")
        assert harness.aggregator.add(dest, ev, now)
    order = [r.request_id for r in harness.flusher.pending(dest)]
    bad = order[137]
    sandbox.reject_request_ids = {bad}

    report = harness.flusher.flush(dest)

    # 1 request for the whole batch, then 2 per halving until the bad record stands alone:
    # 200 -> 100 -> 50 -> 25 -> 13 -> 6 -> 3 -> 1 (7 halvings): 1 + 7 * 2 = 15 requests.
    assert _bisect_requests(200, 137) == 15
    assert report.requests == 15
    assert len(sandbox.requests) == 15
    assert report.sent == 199
    assert report.failed is None
    assert set(sandbox.totals) == set(order) - {bad}
    accepted = [
        body for body in sandbox.requests if bad not in {r["request_id"] for r in body["data"]}
    ]
    assert sum(len(body["data"]) for body in accepted) == 199
    assert sorted(len(body["data"]) for body in sandbox.requests) == sorted(
        [200, 100, 100, 50, 50, 25, 25, 12, 13, 6, 7, 3, 3, 1, 2]
    )

    assert list(report.dead_lettered) == [bad]
    assert harness.dead_letters.count() == 1
    entry = harness.dead_letters.get(f"xmp-xmp-{bad}")
    assert entry is not None
    assert entry.destination == "xmp"
    assert entry.reason.startswith("XMP rejected the record: 400 ")
    assert f"request_id {bad}: rejected by the sandbox" in entry.reason  # XMP's msg
    assert entry.raw_message is not None
    assert json.loads(entry.raw_message)["request_id"] == bad
    assert TOKEN not in entry.model_dump_json()
    assert harness.dirty(dest) == set()


def test_an_event_added_while_a_flush_is_in_progress_keeps_its_key_dirty(
    redis_client: redis.Redis, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    hooks: list[Callable[[], None]] = []

    class AddsWhileSending(HttpClient):
        """The event arrives after the flush read the totals and before it marks them sent."""

        def open(self, method: str, url: str, **kwargs: Any) -> Any:
            while hooks:
                hooks.pop()()
            return super().open(method, url, **kwargs)

    harness = Harness(redis_client, AddsWhileSending("test"))
    for number in range(3):
        harness.aggregator.add(dest, live_event(now, event_id=f"f-{number}"), now)
    (rid,) = harness.dirty(dest)
    late = live_event(now, event_id="f-during", gaid=str(uuid.uuid4()))

    def add_late() -> None:
        assert harness.aggregator.add(dest, late, now)

    hooks.append(add_late)

    first = harness.flusher.flush(dest)
    assert first.requests == 1
    assert sandbox.totals[rid]["event_count"] == 3  # what was read before the late event
    assert harness.dirty(dest) == {rid}, "the late event's key must stay dirty"

    second = harness.flusher.flush(dest)
    assert (second.records, second.sent, second.requests) == (1, 1, 1)
    assert sandbox.totals[rid]["event_count"] == 4
    assert sandbox.totals[rid]["event_unique_users"] == 2
    assert harness.dirty(dest) == set()


def test_marking_sent_with_a_stale_version_keeps_the_key_dirty(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    harness.aggregator.add(dest, live_event(now, event_id="s-1"), now)
    harness.aggregator.add(dest, live_event(now, event_id="s-2", campaign_id="other"), now)
    records = harness.flusher.pending(dest)
    assert len(records) == 2
    changed = records[0].request_id
    harness.aggregator.add(
        dest, live_event(now, event_id="s-3", campaign_id=records[0].dims["campaign_id"]), now
    )
    harness.flusher._sent(dest, records, FlushReport(), None)
    assert harness.dirty(dest) == {changed}


def test_401_pauses_the_destination_and_keeps_records_dirty(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url, token="wrong-token-1234")
    now = datetime.now(UTC)
    for number in range(3):
        ev = live_event(now, event_id=f"u-{number}", campaign_id=f"c{number}")
        assert harness.aggregator.add(dest, ev, now)
    dirty = harness.dirty(dest)

    report = harness.flusher.flush(dest)
    assert report.requests == 1  # no retries against a refusal
    assert report.sent == 0
    assert report.failed is not None
    assert "401" in report.failed
    assert "paused" in report.failed
    until = harness.pauses.paused_until("xmp")
    assert until is not None
    assert until > time.time() + 3600
    assert harness.dirty(dest) == dirty
    assert sandbox.totals == {}
    assert harness.sleeps == []

    # while paused, a flush sends nothing
    paused = harness.flusher.flush(dest)
    assert (paused.requests, paused.failed) == (0, "destination paused")
    assert len(sandbox.requests) == 1

    # the operator fixes the token (here: XMP accepts it) and resumes
    sandbox.token = "wrong-token-1234"
    assert harness.pauses.resume("xmp")
    fixed = harness.flusher.flush(dest)
    assert (fixed.sent, fixed.requests) == (3, 1)
    assert set(sandbox.totals) == dirty
    assert harness.dirty(dest) == set()


def test_5xx_keeps_keys_dirty_without_retrying_in_the_task_and_a_later_flush_sends_them(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    for number in range(4):
        ev = live_event(now, event_id=f"x-{number}", campaign_id=f"c{number}")
        assert harness.aggregator.add(dest, ev, now)
    dirty = harness.dirty(dest)
    sandbox.fail_statuses = [500]

    report = harness.flusher.flush(dest)
    assert report.requests == 1  # one send: the next flush is the retry
    assert harness.sleeps == []  # no waiting inside the task
    assert report.sent == 0
    assert report.failed is not None
    assert "HTTP 500" in report.failed
    assert "4 record(s) stay dirty" in report.failed
    assert report.left_dirty == 4
    assert harness.dirty(dest) == dirty
    assert sandbox.totals == {}
    assert harness.pauses.paused_until("xmp") is None
    logged = list(harness.attempts.iter_records())
    assert [r["notifying_status"] for r in logged] == ["failed"]
    assert [r["response_code"] for r in logged] == ["500"]

    later = harness.flusher.flush(dest)
    assert (later.sent, later.requests, later.failed) == (4, 1, None)
    assert set(sandbox.totals) == dirty
    assert harness.dirty(dest) == set()
    assert harness.sleeps == []


def test_5xx_then_success_sends_on_the_following_flushes_once(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    harness.aggregator.add(dest, live_event(now, event_id="y-1"), now)
    (rid,) = harness.dirty(dest)
    sandbox.fail_statuses = [503, 502]
    first, second, third = (harness.flusher.flush(dest) for _ in range(3))
    assert (first.requests, first.sent, first.left_dirty) == (1, 0, 1)
    assert (second.requests, second.sent, second.left_dirty) == (1, 0, 1)
    assert (third.requests, third.sent, third.failed) == (1, 1, None)
    assert harness.sleeps == []
    assert len(sandbox.requests) == 1  # the two refused sends never reached the totals
    assert sandbox.totals[rid]["event_count"] == 1
    assert harness.dirty(dest) == set()


def test_only_one_flush_runs_at_a_time(harness: Harness, sandbox: SandboxXmp) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    for number in range(2):
        ev = live_event(now, event_id=f"l-{number}", campaign_id=f"c{number}")
        assert harness.aggregator.add(dest, ev, now)
    lock_key = RedisKeys("pr").lock("xmp-flush:xmp")
    lock = harness.redis.lock(lock_key, timeout=60)
    assert lock.acquire(blocking=False)
    try:
        report = harness.flusher.flush(dest)
        assert report.skipped_locked is True
        assert (report.records, report.requests, report.sent) == (0, 0, 0)
        assert sandbox.requests == []
        assert len(harness.dirty(dest)) == 2
    finally:
        lock.release()

    # a real overlap: a slow flush holds the lock while a second one is attempted
    sandbox.delay = 3.0
    results: list[FlushReport] = []
    slow = threading.Thread(target=lambda: results.append(harness.flusher.flush(dest)))
    slow.start()
    deadline = time.monotonic() + 20
    while not harness.redis.exists(lock_key) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert harness.redis.exists(lock_key) == 1  # the slow flush holds it (answer takes 3 s)
    second = Harness(harness.redis).flusher.flush(dest)
    slow.join(30)
    assert second.skipped_locked is True
    assert second.requests == 0
    (first,) = results
    assert (first.skipped_locked, first.sent, first.requests) == (False, 2, 1)
    assert len(sandbox.requests) == 1
    assert harness.redis.exists(lock_key) == 0  # released after the flush


def test_records_that_aged_past_90_days_while_dirty_are_dead_lettered_at_flush(
    harness: Harness, sandbox: SandboxXmp
) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    aging = live_event(
        now, event_id="old-1", campaign_id="aging",
        install_time=(now - timedelta(days=89)).isoformat(), revenue_usd="3.000000",
    )  # fmt: skip
    fresh = live_event(now, event_id="new-1", campaign_id="fresh")
    assert harness.aggregator.add(dest, aging, now)
    assert harness.aggregator.add(dest, fresh, now)
    old_rid = record_key_for(dest, aging, now).request_id
    fresh_rid = record_key_for(dest, fresh, now).request_id

    # the next flush happens three days later: the install is now 92 days back
    report = harness.flusher.flush(dest, now=now + timedelta(days=3))
    assert report.records == 2
    assert (report.sent, report.requests) == (1, 1)
    assert list(sandbox.totals) == [fresh_rid]
    assert all(r["request_id"] != old_rid for body in sandbox.requests for r in body["data"])
    assert list(report.dead_lettered) == [old_rid]
    assert "older than 90 days" in report.dead_lettered[old_rid]

    entry = harness.dead_letters.get(f"xmp-xmp-{old_rid}")
    assert entry is not None
    active = aging.install_time.astimezone(timezone(timedelta(hours=8))).date()  # type: ignore[union-attr]
    assert entry.reason == f"active_date: {active} is older than 90 days; XMP refuses it"
    assert entry.raw_message is not None
    kept = json.loads(entry.raw_message, parse_float=Decimal)
    assert (kept["event_count"], kept["event_revenue_usd"]) == (1, Decimal("3.000000"))
    assert harness.dead_letters.count() == 1
    assert harness.dirty(dest) == set()
    assert date.fromisoformat(kept["active_date"]) == active


def test_attempts_xmp_refused_are_logged_as_failed(harness: Harness, sandbox: SandboxXmp) -> None:
    dest = xmp_dest(sandbox.url)
    now = datetime.now(UTC)
    for number in range(4):
        ev = live_event(now, event_id=f"r-{number}", campaign_id=f"c{number}")
        assert harness.aggregator.add(dest, ev, now)
    order = [r.request_id for r in harness.flusher.pending(dest)]
    sandbox.reject_request_ids = {order[0]}
    report = harness.flusher.flush(dest)
    assert (report.requests, report.sent) == (5, 3)
    logged = list(harness.attempts.iter_records())
    # 4 records (refused), 2 (refused), 1 bad (refused), 1 good, the other 2
    assert [(r["records"], json.loads(r["response_body"])["code"]) for r in logged] == [
        ("4", 400), ("2", 400), ("1", 400), ("1", 200), ("2", 200),
    ]  # fmt: skip
    assert [r["notifying_status"] for r in logged] == ["failed"] * 3 + ["sent"] * 2

    # an unauthorized answer (HTTP 200, code 401) is not "sent" either
    ev = live_event(now, event_id="r-401", campaign_id="c-401")
    assert harness.aggregator.add(dest, ev, now)
    sandbox.token = "rotated-token-0000"
    assert harness.flusher.flush(dest).sent == 0
    last = list(harness.attempts.iter_records())[-1]
    assert json.loads(last["response_body"])["code"] == 401
    assert last["notifying_status"] == "failed"


def test_the_flush_lock_is_held_for_as_long_as_a_slow_flush_runs(
    redis_client: redis.Redis, sandbox: SandboxXmp
) -> None:
    # batch_size 1 stands for a large backlog: five batches, each answered after 50 s
    dest = xmp_dest(sandbox.url, batch_size=1, flush_interval_seconds=1)  # lock: 120 s
    now = datetime.now(UTC)
    lock_key = KEYS.lock("xmp-flush:xmp")
    held: list[bool] = []

    class Slow(HttpClient):
        """Let 50 s pass for the lock's TTL at each send, without waiting them out."""

        def open(self, method: str, url: str, **kwargs: Any) -> Any:
            held.append(bool(redis_client.exists(lock_key)))
            ttl = int(redis_client.pttl(lock_key))
            if ttl > 0:
                left = ttl - 50_000
                if left <= 0:
                    redis_client.delete(lock_key)
                else:
                    redis_client.pexpire(lock_key, left)
            return super().open(method, url, **kwargs)

    harness = Harness(redis_client, Slow("test"))
    for number in range(5):
        ev = live_event(now, event_id=f"z-{number}", campaign_id=f"c{number}")
        assert harness.aggregator.add(dest, ev, now)
    report = harness.flusher.flush(dest)  # 5 batches x 50 s = 250 s, past the lock's 120 s
    assert report.requests == 5
    assert report.sent == 5
    assert report.failed is None
    assert len(held) == 5
    assert all(held), f"the lock lapsed during the flush: {held}"
    assert len(harness.dirty(dest)) == 0


def test_the_delivery_pipeline_aggregates_xmp_deliveries_and_dead_letters_rejects(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    dest = xmp_dest()
    destinations = parse_destinations(
        {"destination": [dest.model_dump(mode="json", exclude_defaults=True)]}
    ).with_secrets({"XMP_TOKEN": TOKEN}, kinds=["xmp"])
    producer = Producer(
        Settings(redis_url=redis_url, destinations_file=tmp_path / "unused.toml"),
        destinations,
        redis_client,
    )
    now = datetime.now(UTC)
    dead_letters = DeadLetterStore(redis_client, KEYS)
    pipeline = DeliveryPipeline(
        destinations=destinations,
        sender=Sender(http_client(Settings())),
        limiter=GlobalRateLimiter(redis.Redis.from_url(redis_url), KEYS),
        pauses=PauseRegistry(redis_client, KEYS),
        requeuer=Requeuer(
            redis_client,
            DelaySet(redis_client, KEYS),
            TaskMessageEncoder(Celery("postback_relay", set_as_current=False)),
            DeliveryLedger(redis_client, KEYS, 600),
        ),
        dead_letters=dead_letters,
        attempts=AttemptLog(redis_client, KEYS, 1000),
        metrics=MetricsRecorder(KEYS),
        redis_client=redis_client,
        keys=KEYS,
        aggregators=[XmpAggregator(redis_client, KEYS)],
    )
    xmp = destinations.get("xmp")

    def envelope(ev: ConversionEvent) -> Any:
        route = xmp.route_for(ev)
        assert route is not None
        return producer.envelope_for(ev, xmp, route, now)

    good = live_event(now, event_id="p-good")
    assert pipeline.run(envelope(good)).status == "aggregated"
    assert pipeline.run(envelope(good)).status == "skipped"  # redelivered: counted once
    aged = live_event(now, event_id="p-aged", install_time=(now - timedelta(days=100)).isoformat())
    result = pipeline.run(envelope(aged))
    assert result.status == "dead_lettered"
    assert "older than 90 days" in result.detail
    entry = dead_letters.get(delivery_id_for("p-aged", "xmp"))
    assert entry is not None
    assert "older than 90 days" in entry.reason
    assert redis_client.zcard(KEYS.xmp_dirty("xmp")) == 1


# --------------------------------------------------------------------------- one shared path


def test_a_401_pauses_and_alarms_through_the_same_code_as_every_kind(
    harness: Harness, sandbox: SandboxXmp, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = xmp_dest(sandbox.url, token="wrong-token-5678")
    now = datetime.now(UTC)
    assert harness.aggregator.add(dest, live_event(now, event_id="a-1"), now)
    heeded: list[tuple[str, Outcome]] = []
    shared = OutcomeEffects.pause_if_asked

    def spy(self: OutcomeEffects, destination: str, outcome: Outcome) -> None:
        heeded.append((destination, outcome))
        shared(self, destination, outcome)

    monkeypatch.setattr(OutcomeEffects, "pause_if_asked", spy)
    with structlog.testing.capture_logs() as logs:
        report = harness.flusher.flush(dest)

    ((name, outcome),) = heeded
    assert name == "xmp"
    assert isinstance(outcome, PermanentFailure)
    assert (outcome.alarm, outcome.pause_seconds) == (True, 24 * 3600)
    assert outcome.reason.startswith("XMP answered 401 ")
    assert report.failed is not None
    assert report.failed.endswith(": destination paused")
    assert harness.pauses.paused_until("xmp") is not None
    alarms = {line["event"]: line for line in logs if line.get("alarm")}
    assert set(alarms) == {"destination.paused", "destination.auth_failed"}
    paused = alarms["destination.paused"]
    assert paused["destination"] == "xmp"
    assert paused["resume_with"] == "postback-relay destinations resume xmp"
    assert alarms["destination.auth_failed"]["destination"] == "xmp"
    assert "wrong-token-5678" not in json.dumps(logs, default=str)
    assert harness.dead_letters.count() == 0  # the records are fine: they wait for the resume
    assert len(harness.dirty(dest)) == 1


def refused_url() -> str:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/s2s/postback/v2"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("down", ["answers 503", "refuses connections"])
def test_a_flush_against_a_down_xmp_sends_once_leaves_records_dirty_and_the_next_flush_sends_them(
    harness: Harness, sandbox: SandboxXmp, down: str
) -> None:
    with contextlib.ExitStack() as stack:
        if down == "answers 503":  # a real local server: 503, no Retry-After, to every request
            url = stack.enter_context(SandboxXmp(token=TOKEN, fail_statuses=[503] * 10)).url
        else:
            url = refused_url()
        # Ten batches: the old flush made 3 attempts and 2 sleeps (30 s) for each of them.
        dest = xmp_dest(url, batch_size=2)
        now = datetime.now(UTC)
        for number in range(20):
            ev = live_event(now, event_id=f"d-{number}", campaign_id=f"c{number}")
            assert harness.aggregator.add(dest, ev, now)
        dirty = harness.dirty(dest)
        started = time.monotonic()
        report = harness.flusher.flush(dest)
        elapsed = time.monotonic() - started

    # The bound that matters is the task's hard time limit (60 s); one request, no sleeps.
    assert elapsed < 60
    assert harness.sleeps == []
    assert (report.requests, report.sent, report.left_dirty) == (1, 0, 20)
    assert report.failed is not None
    assert "20 record(s) stay dirty for the next flush" in report.failed
    if down == "answers 503":
        assert "HTTP 503" in report.failed
    else:
        assert "connection error" in report.failed
    assert harness.dirty(dest) == dirty
    assert harness.pauses.paused_until("xmp") is None  # no Retry-After: nothing to obey
    assert harness.dead_letters.count() == 0
    (logged,) = list(harness.attempts.iter_records())
    assert (logged["notifying_status"], logged["records"]) == ("failed", "2")

    # XMP is back (same destination name, so the same totals): each record is sent once.
    recovered = harness.flusher.flush(xmp_dest(sandbox.url, batch_size=2))
    assert (recovered.requests, recovered.sent, recovered.failed) == (10, 20, None)
    assert set(sandbox.totals) == dirty
    assert all(r["event_count"] == 1 for r in sandbox.totals.values())
    assert sum(len(body["data"]) for body in sandbox.requests) == 20
    assert harness.dirty(dest) == set()
    assert harness.flusher.flush(xmp_dest(sandbox.url)).requests == 0
