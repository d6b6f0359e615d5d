"""The AppMetrica reconciler against a real Redis and an in-process SandboxAppMetrica.

The Reconciler is driven directly (no Celery worker): what it enqueues on "postback.redeliver"
is decoded and asserted exactly. Also the [[reconcile]] config rules and the redeliver kind's
SSRF refusal and per-host rate-limit key.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import requests
from celery import Celery

from config.destination_base import ConfigError
from config.destinations import Destinations, parse_destinations
from config.keys import RedisKeys, queue_for
from config.kinds.redeliver import RedeliverDestination
from config.reconcile import ReconcileSource
from schemas.appmetrica import EXPORT_FIELDS, TIME_FORMAT, ExportRow
from schemas.envelope import DeliveryEnvelope, Redelivery, delivery_id_for
from schemas.outcomes import PermanentFailure
from workers.broker.wire import TaskMessageEncoder, decode_task_args
from workers.kinds.base import OutgoingRequest
from workers.kinds.redeliver.adapter import RedeliverAdapter
from workers.kinds.redeliver.reconciler import Reconciler, RunReport
from workers.kinds.redeliver.sandbox import SandboxAppMetrica
from workers.metrics import RECONCILE_STATES
from workers.stores.delay import DelaySet

TOKEN = "appmetrica-oauth-5b1e9c07d2"
KEYS = RedisKeys("pr")
QUEUE = queue_for("redeliver")
NOW = int(time.time())
PARTNER = "https://adcolony.servecvr.com/"


def destinations_toml(base_url: str, reconcile_extra: str = "", dest_extra: str = "") -> str:
    return f"""
[[destination]]
name = "redeliver"
kind = "redeliver"
allow_private = true            # the sandbox/receiver are on 127.0.0.1
retry = {{ max_attempts = 2, schedule = [0.3, 0.3], jitter = 0 }}
{dest_extra}

[[reconcile]]
name = "main"
application_id = "1111"
token = {{ env = "APPMETRICA_TOKEN" }}
redeliver_to = "redeliver"
base_url = "{base_url}"
settle_seconds = 0
poll_seconds = 1
{reconcile_extra}
"""


def load(text: str, environ: dict[str, str] | None = None) -> Destinations:
    """The file as a redeliver worker (which runs the reconciler) sees it at start-up."""
    env = {"APPMETRICA_TOKEN": TOKEN} if environ is None else environ
    return parse_destinations(tomllib.loads(text), "test.toml").with_secrets(
        env, kinds=["redeliver"]
    )


def make_reconciler(
    client: redis.Redis, destinations: Destinations, clock: Callable[[], float] = time.time
) -> Reconciler:
    return Reconciler(
        client,
        KEYS,
        requests.Session(),
        destinations=destinations,
        encoder=TaskMessageEncoder(Celery("t", set_as_current=False)),
        delays=DelaySet(client, KEYS),
        clock=clock,
    )


def row(
    postback_url: str,
    status: str,
    ts: int = NOW - 3600,
    device: str = "6D92078A-8246-4BA4-AE5B-76104861E7DC",
    **extra: Any,
) -> dict[str, Any]:
    """One attempt row, every value a string as in AppMetrica's official example."""
    return {
        "application_id": "1111",
        "click_id": "f2ae4254de8844dda58b29cac2cf0e87",
        "click_ipv6": "::ffff:5.255.232.147",
        "publisher_name": "AdColony",
        "google_aid": "",
        "ios_ifa": device,
        "appmetrica_device_id": "123456789012345678",
        "conversion_datetime": datetime.fromtimestamp(ts, UTC).strftime(TIME_FORMAT),
        "conversion_timestamp": str(ts),
        "event_name": "New person",
        "attempt_datetime": datetime.fromtimestamp(ts + 5, UTC).strftime(TIME_FORMAT),
        "attempt_timestamp": str(ts + 5),
        "cost_model": "cpi",
        "notifying_status": status,
        "postback_url": postback_url,
        "postback_url_parameters": postback_url.partition("?")[2],
        "response_body": "SUCCESS" if status == "sent" else "Service Unavailable",
        "response_code": "200" if status == "sent" else "503",
        **extra,
    }


def pb_url(name: str) -> str:
    return f"{PARTNER}?transaction_id={name}&event=New%20person&ifa=6D92078A"


def queued(client: redis.Redis) -> list[tuple[dict[str, Any], DeliveryEnvelope]]:
    """Every message on the redeliver queue: (headers, envelope)."""
    out = []
    for wire in client.lrange(QUEUE, 0, -1):
        headers, args = decode_task_args(wire.decode())
        out.append((headers, DeliveryEnvelope.model_validate(args[0])))
    return out


def source_of(destinations: Destinations) -> ReconcileSource:
    return destinations.reconcile["main"]


@pytest.fixture
def sandbox() -> Iterator[SandboxAppMetrica]:
    with SandboxAppMetrica(token=TOKEN) as server:
        yield server


@pytest.fixture
def dests(sandbox: SandboxAppMetrica) -> Destinations:
    return load(destinations_toml(sandbox.url))


# --- which postbacks are redelivered ------------------------------------------------------------


def test_failed_then_sent_is_skipped_and_failed_only_is_redelivered_once(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.rows = [
        row(pb_url("a"), "failed"),  # a: failed, later sent
        row(pb_url("a"), "sent"),
        row(pb_url("b"), "sent"),  # b: sent listed before its failed attempt
        row(pb_url("b"), "failed"),
        row(pb_url("c"), "failed", ts=NOW - 7200),  # c: two failed attempts, never sent
        row(pb_url("c"), "failed", ts=NOW - 7200),
        row(pb_url("d"), "failed", event_name="purchase", cost_model="cpa"),  # d: failed once
        row(pb_url("e"), "sent"),  # e: sent at once
        row(pb_url("f"), "failed", device="AAAAAAAA-0000-0000-0000-000000000001"),  # f: failed
        row(pb_url("f"), "sent", device="BBBBBBBB-0000-0000-0000-000000000002"),  # other device
    ]
    report = make_reconciler(redis_client, dests).run(source_of(dests))

    assert report.state == "done", report.detail
    assert (report.rows_read, report.unparseable) == (10, 0)
    assert report.postbacks == 7  # a, b, c, d, e, f on device A, f on device B
    assert report.already_sent == 4
    assert report.to_redeliver == 3
    assert report.redelivered == 3
    assert report.skipped_already_redelivered == 0

    messages = queued(redis_client)
    assert len(messages) == 3
    by_url = {env.redelivery.postback_url: (h, env) for h, env in messages if env.redelivery}
    # exactly the exported URLs, byte for byte
    assert set(by_url) == {pb_url("c"), pb_url("d"), pb_url("f")}
    assert sorted(report.delivery_ids) == sorted(env.delivery_id for _, env in messages)

    headers, env = by_url[pb_url("d")]
    assert headers["task"] == "postback_relay.deliver_redeliver"
    assert headers["id"] == env.delivery_id
    assert env.destination == "redeliver"
    assert env.kind == "redeliver"
    assert env.attempt == 0
    assert env.max_attempts == 3  # 1 + retry.max_attempts
    assert env.event is None
    assert env.redelivery is not None
    assert env.redelivery.application_id == "1111"
    assert env.redelivery.event_name == "purchase"
    assert env.redelivery.source == "main"
    assert env.redelivery.conversion_time == datetime.fromtimestamp(NOW - 3600, UTC)
    identity = ExportRow.model_validate(row(pb_url("d"), "failed", cost_model="cpa")).identity
    assert env.delivery_id == delivery_id_for(f"reconcile:main:{identity}", "redeliver")
    _, env_c = by_url[pb_url("c")]
    assert env_c.redelivery is not None
    assert env_c.redelivery.conversion_time == datetime.fromtimestamp(NOW - 7200, UTC)

    # one claim per redelivered postback, kept for retention_days (30 by default)
    claims = list(redis_client.scan_iter(match="{pr}:reconcile:main:done:*"))
    assert len(claims) == 3
    ttl = redis_client.ttl(claims[0])
    assert 30 * 86_400 - 60 <= ttl <= 30 * 86_400


def test_dry_run_counts_but_enqueues_and_claims_nothing(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.rows = [
        row(pb_url("a"), "failed", ts=NOW - 600),
        row(pb_url("b"), "failed", ts=NOW - 600),
        row(pb_url("b"), "sent", ts=NOW - 600),
    ]
    reconciler = make_reconciler(redis_client, dests, clock=lambda: float(NOW))
    report = reconciler.run(source_of(dests), dry_run=True)
    assert report.state == "done"
    assert (report.rows_read, report.postbacks, report.already_sent) == (3, 2, 1)
    assert (report.to_redeliver, report.redelivered) == (1, 1)
    assert redis_client.llen(QUEUE) == 0
    assert list(redis_client.scan_iter(match="{pr}:reconcile:main:*")) == []

    real = reconciler.run(source_of(dests))
    assert (real.redelivered, real.skipped_already_redelivered) == (1, 0)
    again = reconciler.run(source_of(dests), dry_run=True)
    assert (again.redelivered, again.skipped_already_redelivered) == (0, 1)
    assert redis_client.llen(QUEUE) == 1


def test_overlapping_runs_redeliver_each_postback_once(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    now = [float(NOW)]
    reconciler = make_reconciler(redis_client, dests, clock=lambda: now[0])
    source = source_of(dests)  # overlap_seconds = 3600 (default)
    sandbox.rows = [row(pb_url(f"old{i}"), "failed", ts=NOW - 1800) for i in range(5)]

    first = reconciler.run(source)
    assert first.state == "done"
    assert (first.redelivered, first.skipped_already_redelivered) == (5, 0)

    # A new failure arrives; the next run starts an hour before the checkpoint.
    sandbox.rows.append(row(pb_url("new"), "failed", ts=NOW + 300))
    now[0] = NOW + 600
    second = reconciler.run(source)
    assert second.state == "done"
    assert second.since == datetime.fromtimestamp(NOW - 3600, UTC)
    assert second.since < first.until  # the windows overlap
    assert second.postbacks == 6
    assert second.to_redeliver == 6
    assert second.redelivered == 1
    assert second.skipped_already_redelivered == 5

    # An explicit window over everything redelivers nothing more.
    third = reconciler.run(
        source, datetime.fromtimestamp(NOW - 86_400, UTC), datetime.fromtimestamp(NOW + 900, UTC)
    )
    assert (third.redelivered, third.skipped_already_redelivered) == (0, 6)

    messages = queued(redis_client)
    assert len(messages) == 6
    urls = sorted(env.redelivery.postback_url for _, env in messages if env.redelivery)
    assert urls == sorted([pb_url("new")] + [pb_url(f"old{i}") for i in range(5)])


def test_two_concurrent_reconcilers_redeliver_each_postback_once(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_url: str, redis_client: redis.Redis
) -> None:
    failed_only = 300
    sandbox.rows = [row(pb_url(f"f{i}"), "failed") for i in range(failed_only)]
    for i in range(100):
        sandbox.rows += [row(pb_url(f"s{i}"), "failed"), row(pb_url(f"s{i}"), "sent")]
    since = datetime.fromtimestamp(NOW - 86_400, UTC)
    until = datetime.fromtimestamp(NOW, UTC)

    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    reconcilers = [make_reconciler(c, dests) for c in clients]
    barrier = threading.Barrier(2)
    reports: list[RunReport] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(reconciler: Reconciler) -> None:
        try:
            barrier.wait(timeout=10)
            # with wait_for_lock the second waits for the per-source lock instead of giving up
            report = reconciler.run(source_of(dests), since, until, wait_for_lock=60)
            with lock:
                reports.append(report)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in reconcilers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for c in clients:
        c.close()

    assert errors == []
    assert len(reports) == 2
    assert [r.state for r in reports] == ["done", "done"]
    assert sum(r.redelivered for r in reports) == failed_only
    assert sum(r.skipped_already_redelivered for r in reports) == failed_only
    assert sorted(r.redelivered for r in reports) == [0, failed_only]
    assert all(r.to_redeliver == failed_only for r in reports)
    assert all(r.already_sent == 100 for r in reports)

    messages = queued(redis_client)
    assert len(messages) == failed_only
    assert len({env.delivery_id for _, env in messages}) == failed_only
    # both asked AppMetrica for the same window
    assert len(sandbox.requests) == 2
    assert sandbox.requests[0] == sandbox.requests[1]


def test_a_run_without_wait_for_lock_gives_way_to_a_running_one(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.rows = [row(pb_url("a"), "failed")]
    held = redis_client.lock(KEYS.lock("reconcile:main"), timeout=60)
    assert held.acquire(blocking=False)
    try:
        report = make_reconciler(redis_client, dests).run(source_of(dests))
    finally:
        held.release()
    assert report.state == "locked"
    assert report.redelivered == 0
    assert sandbox.requests == []
    assert redis_client.llen(QUEUE) == 0


# --- AppMetrica's answers: 202, 429, 401 ---------------------------------------------------------


def test_202_is_polled_with_the_same_window_until_ready(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.polls_before_ready = 2
    sandbox.rows = [
        row(pb_url("a"), "failed"),
        row(pb_url("b"), "failed"),
        row(pb_url("b"), "sent"),
    ]
    now = [float(NOW)]
    reconciler = make_reconciler(redis_client, dests, clock=lambda: now[0])
    source = source_of(dests)

    reports = []
    for _ in range(3):
        reports.append(reconciler.run(source))
        now[0] += 45  # time moves on between polls; the window must not
    assert [r.state for r in reports] == ["pending", "pending", "done"]
    assert reports[0].detail == "export is being prepared"
    assert len({(r.since, r.until) for r in reports}) == 1
    assert reports[0].until == datetime.fromtimestamp(NOW, UTC)
    assert [r.redelivered for r in reports] == [0, 0, 1]
    assert (reports[2].postbacks, reports[2].already_sent) == (2, 1)

    # the sandbox saw the identical query three times
    assert len(sandbox.requests) == 3
    assert sandbox.requests[0] == sandbox.requests[1] == sandbox.requests[2]
    assert sandbox.requests[0]["date_until"] == reports[0].until.strftime(TIME_FORMAT)
    assert sandbox.requests[0]["fields"] == ",".join(EXPORT_FIELDS)
    assert sandbox.requests[0]["application_id"] == "1111"
    # each 202 was read to its end, so the polls reuse one kept-alive connection (a response
    # closed unread resets the connection instead)
    assert len(set(sandbox.client_ports)) == 1, sandbox.client_ports

    assert redis_client.llen(QUEUE) == 1
    assert redis_client.get(KEYS.reconcile_pending("main")) is None
    checkpoint = redis_client.get(KEYS.reconcile_checkpoint("main"))
    assert checkpoint is not None
    assert float(checkpoint) == reports[2].until.timestamp()


def test_a_pending_export_is_polled_again_by_a_task_parked_in_the_delay_set(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.polls_before_ready = 10
    now = float(NOW)
    reconciler = make_reconciler(redis_client, dests, clock=lambda: now)
    source = source_of(dests)
    report = reconciler.run(source)
    assert report.state == "pending"

    wait = reconciler.poll_again_later(source, report, "postback_relay.reconcile", QUEUE)

    assert wait == source.poll_seconds
    ((wire, due),) = redis_client.zrange(KEYS.delayed(QUEUE), 0, -1, withscores=True)
    assert due == now + source.poll_seconds
    headers, args = decode_task_args(wire.decode())
    assert (headers["task"], args) == ("postback_relay.reconcile", ["main"])
    assert redis_client.llen(QUEUE) == 0  # no worker holds it while AppMetrica prepares


def test_a_rate_limited_export_is_polled_again_after_retry_after(
    dests: Destinations, redis_client: redis.Redis
) -> None:
    reconciler = make_reconciler(redis_client, dests, clock=lambda: float(NOW))
    source = source_of(dests)
    limited = RunReport("main", datetime.now(UTC), datetime.now(UTC), state="rate_limited")
    assert reconciler.poll_again_later(source, limited, "t", QUEUE) == 60
    limited.retry_after = 7.5
    assert reconciler.poll_again_later(source, limited, "t", QUEUE) == 7.5
    scores = [
        score for _, score in redis_client.zrange(KEYS.delayed(QUEUE), 0, -1, withscores=True)
    ]
    assert sorted(scores) == [NOW + 7.5, NOW + 60]


def test_an_operator_run_fixes_its_window_once_and_polls_the_identical_request(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    """--since without --until: "now minus settle" is taken once, not at every poll."""
    sandbox.polls_before_ready = 2
    sandbox.rows = [row(pb_url("a"), "failed")]
    now = [float(NOW)]
    reconciler = make_reconciler(redis_client, dests, clock=lambda: now[0])
    waits: list[tuple[str, int, float, float]] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds + 44  # a poll takes time too: the clock moves on by 45 s

    since = datetime.fromtimestamp(NOW - 48 * 3600, UTC)
    report = reconciler.run_until_ready(
        source_of(dests),
        since,
        max_wait=300,
        on_wait=lambda r, polls, elapsed, wait: waits.append((r.state, polls, elapsed, wait)),
        sleep=sleep,
    )
    assert (report.state, report.redelivered) == ("done", 1)
    assert (report.since, report.until) == (since, datetime.fromtimestamp(NOW, UTC))
    assert waits == [("pending", 1, 0.0, 1.0), ("pending", 2, 45.0, 1.0)]
    assert len(sandbox.queries) == 3
    assert len(set(sandbox.queries)) == 1
    assert redis_client.get(KEYS.reconcile_checkpoint("main")) is None  # the operator's window
    assert redis_client.get(KEYS.reconcile_pending("main")) is None


def test_an_operator_run_gives_up_after_max_wait_and_keeps_the_pending_window(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.polls_before_ready = 10**9
    now = [float(NOW)]
    reconciler = make_reconciler(redis_client, dests, clock=lambda: now[0])

    def sleep(seconds: float) -> None:
        now[0] += seconds

    report = reconciler.run_until_ready(source_of(dests), max_wait=5, sleep=sleep)
    assert report.state == "timed_out"
    assert report.detail == "6 poll(s) in 5s, the last answer: export is being prepared"
    assert report.redelivered == 0
    assert len(sandbox.queries) == 6
    assert len(set(sandbox.queries)) == 1
    # The checkpoint's window stays pending: the next run asks for the export being prepared.
    pending = redis_client.get(KEYS.reconcile_pending("main"))
    assert pending is not None
    assert json.loads(pending)["until"] == report.until.timestamp()
    assert redis_client.get(KEYS.reconcile_checkpoint("main")) is None
    assert reconciler.run(source_of(dests)).until == report.until


def test_429_when_more_than_three_exports_are_queued(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.polls_before_ready = 10
    sandbox.rows = [row(pb_url("a"), "failed")]
    reconciler = make_reconciler(redis_client, dests)
    source = source_of(dests)
    until = datetime.fromtimestamp(NOW, UTC)
    states = []
    for hours in (1, 2, 3, 4):
        report = reconciler.run(source, until - timedelta(hours=hours), until)
        states.append(report.state)
    assert states == ["pending", "pending", "pending", "rate_limited"]
    assert "3 exports queued" in report.detail
    assert report.redelivered == 0
    assert len(sandbox.requests) == 4
    # an already queued export is still served (polled) while others wait
    again = reconciler.run(source, until - timedelta(hours=1), until)
    assert again.state == "pending"
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.get(KEYS.reconcile_checkpoint("main")) is None


def test_401_with_a_wrong_token_enqueues_nothing_and_clears_the_pending_window(
    sandbox: SandboxAppMetrica, redis_client: redis.Redis
) -> None:
    text = destinations_toml(sandbox.url)
    good = load(text)
    wrong = load(text, {"APPMETRICA_TOKEN": "not-the-token"})
    sandbox.polls_before_ready = 1
    sandbox.rows = [row(pb_url("a"), "failed")]

    pending = make_reconciler(redis_client, good).run(source_of(good))
    assert pending.state == "pending"
    assert redis_client.get(KEYS.reconcile_pending("main")) is not None

    report = make_reconciler(redis_client, wrong).run(source_of(wrong))
    assert report.state == "unauthorized"
    assert "401" in report.detail
    assert "not-the-token" not in report.detail
    assert (report.rows_read, report.redelivered) == (0, 0)
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.get(KEYS.reconcile_pending("main")) is None
    assert redis_client.get(KEYS.reconcile_checkpoint("main")) is None
    assert sandbox.requests[-1]["application_id"] == "1111"


def test_each_run_counts_its_end_state_and_a_read_export_its_time_for_the_alerts(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    """What postback_relay_reconcile_runs_total and ..._last_success_timestamp_seconds serve:
    dry runs are an operator's look and count nothing."""
    source = source_of(dests)
    reconciler = make_reconciler(redis_client, dests, clock=lambda: float(NOW))
    sandbox.rows = [row(pb_url("a"), "failed")]
    assert reconciler.run(source, dry_run=True).state == "done"
    assert redis_client.hgetall(KEYS.metrics_reconcile_runs()) == {}
    sandbox.polls_before_ready = 2  # the dry run's request was the first poll
    assert reconciler.run(source).state == "pending"
    assert reconciler.run(source).state == "done"
    sandbox.polls_before_ready, sandbox.raw_body = 0, b'{"data": [{"postback_url'
    assert reconciler.run(source).state == "failed"

    runs = redis_client.hgetall(KEYS.metrics_reconcile_runs())
    assert runs == {b"main|pending": b"1", b"main|done": b"1", b"main|failed": b"1"}
    assert float(redis_client.hget(KEYS.metrics_reconcile_done(), "main") or 0) == NOW
    assert {k.decode().split("|")[1] for k in runs} <= set(RECONCILE_STATES)


# --- parsing ----------------------------------------------------------------------------------------


def test_unparseable_rows_are_counted_and_named_not_fatal(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    sandbox.rows = [
        row(pb_url("good"), "failed"),
        row(pb_url("bad1"), "pending"),  # not sent|failed
        row("", "failed"),  # no URL
        row(pb_url("bad3"), "failed", conversion_timestamp="yesterday"),
        row(pb_url("bad4"), "failed", response_code="Service Unavailable"),
        row(pb_url("bad5"), "failed", attempt_timestamp="soon"),
        row(pb_url("bad6"), "maybe"),
        row(pb_url("also-good"), "failed", response_code=""),  # empty code parses
    ]
    report = make_reconciler(redis_client, dests).run(source_of(dests))
    assert report.state == "done"
    assert report.rows_read == 8
    assert report.unparseable == 6
    assert len(report.unparseable_examples) == 5  # examples are capped, the count is not
    examples = report.unparseable_examples
    assert examples[0].startswith("row 2: notifying_status")
    assert examples[1].startswith("row 3: postback_url")
    assert examples[2].startswith("row 4: conversion_timestamp")
    assert "'yesterday'" in examples[2]
    assert examples[3].startswith("row 5: response_code")
    assert examples[4].startswith("row 6: attempt_timestamp")
    assert (report.postbacks, report.to_redeliver, report.redelivered) == (2, 2, 2)
    urls = {env.redelivery.postback_url for _, env in queued(redis_client) if env.redelivery}
    assert urls == {pb_url("good"), pb_url("also-good")}


def test_numbers_as_ints_or_strings_both_parse(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    as_ints = {
        "application_id": 1111,
        "postback_url": pb_url("ints"),
        "conversion_timestamp": NOW - 100,
        "event_name": "purchase",
        "cost_model": "cpa",
        "notifying_status": "failed",
        "attempt_timestamp": NOW - 90,
        "response_code": 500,
        "google_aid": "38400000-8cf0-11bd-b23e-10b96e40000d",
        "ios_ifa": "",
        "appmetrica_device_id": 123456789012345678,
        "click_id": "",
    }
    as_strings = {k: str(v) for k, v in as_ints.items()} | {"postback_url": pb_url("strings")}
    blanks = as_strings | {
        "postback_url": pb_url("blanks"),
        "response_code": "",
        "attempt_timestamp": " ",
    }
    sandbox.raw_body = json.dumps({"data": [as_ints, as_strings, blanks]}).encode()

    report = make_reconciler(redis_client, dests).run(source_of(dests))
    assert report.state == "done"
    assert (report.rows_read, report.unparseable, report.redelivered) == (3, 0, 3)
    envelopes = {e.redelivery.postback_url: e for _, e in queued(redis_client) if e.redelivery}
    assert set(envelopes) == {pb_url("ints"), pb_url("strings"), pb_url("blanks")}
    for envelope in envelopes.values():
        assert envelope.redelivery is not None
        assert envelope.redelivery.application_id == "1111"
        assert envelope.redelivery.conversion_time == datetime.fromtimestamp(NOW - 100, UTC)

    parsed_int = ExportRow.model_validate(as_ints)
    parsed_str = ExportRow.model_validate(as_strings)
    assert parsed_int.response_code == parsed_str.response_code == 500
    assert parsed_int.conversion_timestamp == parsed_str.conversion_timestamp == NOW - 100
    assert parsed_int.appmetrica_device_id == parsed_str.appmetrica_device_id
    assert parsed_int.appmetrica_device_id == "123456789012345678"
    blank = ExportRow.model_validate(blanks)
    assert (blank.response_code, blank.attempt_timestamp) == (None, None)
    # the same postback given with ints or strings is the same postback
    assert (
        parsed_int.identity
        == ExportRow.model_validate(as_strings | {"postback_url": pb_url("ints")}).identity
    )


def test_large_gzip_export_is_streamed_with_exact_counts(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    rows: list[dict[str, Any]] = []
    for i in range(10_000):  # failed twice, never sent: 20,000 rows
        url = f"{PARTNER}?transaction_id=never-{i}"
        rows += [row(url, "failed", device=f"dev-n-{i}")] * 2
    for i in range(10_000):  # failed, then sent: 20,000 rows
        url = f"{PARTNER}?transaction_id=late-{i}"
        rows += [row(url, "failed", device=f"dev-l-{i}"), row(url, "sent", device=f"dev-l-{i}")]
    for i in range(10_000):  # sent at once: 10,000 rows
        rows.append(row(f"{PARTNER}?transaction_id=ok-{i}", "sent", device=f"dev-o-{i}"))
    sandbox.rows = rows

    encodings: list[str] = []
    reconciler = make_reconciler(redis_client, dests)
    reconciler.session.hooks["response"].append(
        lambda r, *a, **k: encodings.append(r.headers.get("Content-Encoding", ""))
    )
    report = reconciler.run(source_of(dests))

    assert report.state == "done", report.detail
    assert encodings == ["gzip"]
    assert report.rows_read == 50_000
    assert report.unparseable == 0
    assert report.postbacks == 30_000
    assert report.already_sent == 20_000
    assert report.to_redeliver == 10_000
    assert report.redelivered == 10_000
    assert redis_client.llen(QUEUE) == 10_000
    sample = {e.redelivery.postback_url for _, e in queued(redis_client)[:200] if e.redelivery}
    assert all("transaction_id=never-" in url for url in sample)


def test_malformed_export_body_ends_the_run_as_failed(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    good = json.dumps(row(pb_url("a"), "failed"))
    sandbox.raw_body = ('{"data": [' + good + ', {"application_id": "11').encode()
    report = make_reconciler(redis_client, dests).run(source_of(dests))
    assert report.state == "failed"
    assert report.detail
    assert report.redelivered == 0
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.get(KEYS.reconcile_checkpoint("main")) is None


def test_malformed_export_body_is_never_silent(
    sandbox: SandboxAppMetrica, dests: Destinations, redis_client: redis.Redis
) -> None:
    """Whatever the outcome, a malformed export neither enqueues nor moves the checkpoint, and
    the run either reports 'failed' or raises (it is never reported as done)."""
    sandbox.raw_body = b'{"data": [{"application_id": "1111", "postback_url": '
    reconciler = make_reconciler(redis_client, dests)
    raised: Exception | None = None
    report: RunReport | None = None
    try:
        report = reconciler.run(source_of(dests))
    except Exception as exc:
        raised = exc
    if raised is None:
        assert report is not None
        assert report.state == "failed"
    else:
        assert "JSON" in type(raised).__name__
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.get(KEYS.reconcile_checkpoint("main")) is None
    # the lock was released: a later run with a good export succeeds
    sandbox.raw_body = None
    sandbox.rows = [row(pb_url("a"), "failed")]
    after = reconciler.run(source_of(dests))
    assert (after.state, after.redelivered) == ("done", 1)


# --- checkpoint and window ----------------------------------------------------------------------


def test_checkpoint_is_until_and_the_next_window_overlaps_it(
    sandbox: SandboxAppMetrica, redis_client: redis.Redis
) -> None:
    dests = load(
        destinations_toml(sandbox.url).replace("settle_seconds = 0", "settle_seconds = 120")
        + "overlap_seconds = 600\nfirst_look_back_seconds = 7200\n"
    )
    source = source_of(dests)
    assert (source.settle_seconds, source.overlap_seconds) == (120, 600)
    now = [float(NOW)]
    reconciler = make_reconciler(redis_client, dests, clock=lambda: now[0])
    utc = lambda t: datetime.fromtimestamp(t, UTC)  # noqa: E731

    assert reconciler.window(source) == (utc(NOW - 7200), utc(NOW - 120))
    first = reconciler.run(source)
    assert first.state == "done"
    assert (first.since, first.until) == (utc(NOW - 7200), utc(NOW - 120))
    assert sandbox.requests[-1]["date_since"] == utc(NOW - 7200).strftime(TIME_FORMAT)
    assert sandbox.requests[-1]["date_until"] == utc(NOW - 120).strftime(TIME_FORMAT)
    checkpoint = redis_client.get(KEYS.reconcile_checkpoint("main"))
    assert checkpoint is not None
    assert float(checkpoint) == NOW - 120

    now[0] = NOW + 1000
    assert reconciler.window(source) == (utc(NOW - 120 - 600), utc(NOW + 1000 - 120))
    second = reconciler.run(source)
    assert (second.since, second.until) == (utc(NOW - 720), utc(NOW + 880))
    assert sandbox.requests[-1]["date_since"] == utc(NOW - 720).strftime(TIME_FORMAT)
    assert sandbox.requests[-1]["date_until"] == utc(NOW + 880).strftime(TIME_FORMAT)
    assert float(redis_client.get(KEYS.reconcile_checkpoint("main")) or 0) == NOW + 880

    # an explicit window neither reads nor moves the checkpoint
    explicit = reconciler.run(source, utc(NOW - 50_000), utc(NOW - 40_000))
    assert explicit.state == "done"
    assert float(redis_client.get(KEYS.reconcile_checkpoint("main")) or 0) == NOW + 880
    assert len(sandbox.requests) == 3


# --- configuration ----------------------------------------------------------------------------------


def test_valid_reconcile_config_parses(dests: Destinations, sandbox: SandboxAppMetrica) -> None:
    source = source_of(dests)
    assert source.application_id == "1111"
    assert source.base_url == sandbox.url
    assert source.token_value() == TOKEN
    assert TOKEN not in repr(source)
    assert source.redeliver_to == "redeliver"
    assert isinstance(dests.get("redeliver"), RedeliverDestination)
    assert dests.get("redeliver").routes == []


def test_redeliver_to_must_name_a_redeliver_destination(sandbox: SandboxAppMetrica) -> None:
    templated = """
[[destination]]
name = "net"
kind = "templated"
url = "https://pb.example/x?i=(idfa)"
[[destination.routes]]
type = "install"
"""
    text = destinations_toml(sandbox.url).replace(
        'redeliver_to = "redeliver"', 'redeliver_to = "net"'
    )
    with pytest.raises(ConfigError) as info:
        load(templated + text)
    message = str(info.value)
    assert "reconcile 'main'" in message
    assert "redeliver_to" in message
    assert "'net'" in message
    assert "kind redeliver" in message

    missing = destinations_toml(sandbox.url).replace(
        'redeliver_to = "redeliver"', 'redeliver_to = "nope"'
    )
    with pytest.raises(ConfigError, match=r"reconcile 'main': redeliver_to: 'nope'"):
        load(missing)


def test_retention_days_must_outlast_the_look_back(sandbox: SandboxAppMetrica) -> None:
    with pytest.raises(ConfigError) as info:
        load(destinations_toml(sandbox.url, "retention_days = 1"))
    message = str(info.value)
    assert "reconcile 'main'" in message
    assert "retention_days" in message
    # 2 days outlast 24 h look-back + 1 h overlap
    assert load(destinations_toml(sandbox.url, "retention_days = 2")).reconcile["main"]


def test_missing_token_env_is_a_config_error(sandbox: SandboxAppMetrica) -> None:
    with pytest.raises(ConfigError) as info:
        load(destinations_toml(sandbox.url), {})
    message = str(info.value)
    assert "reconcile 'main'" in message
    assert "token" in message
    assert "APPMETRICA_TOKEN" in message
    with pytest.raises(ConfigError, match="APPMETRICA_TOKEN"):
        load(destinations_toml(sandbox.url), {"APPMETRICA_TOKEN": ""})


def test_redeliver_destination_takes_no_routes(sandbox: SandboxAppMetrica) -> None:
    text = destinations_toml(sandbox.url).replace(
        "\n[[reconcile]]", '[[destination.routes]]\ntype = "install"\n\n[[reconcile]]'
    )
    with pytest.raises(ConfigError, match=r"destination 'redeliver': routes"):
        load(text)


# --- the redeliver kind: SSRF refusal and per-host limits ------------------------------------------


def adapter(**fields: Any) -> RedeliverAdapter:
    return RedeliverAdapter(
        RedeliverDestination.model_validate({"kind": "redeliver", "name": "redeliver", **fields})
    )


def envelope_for(url: str) -> DeliveryEnvelope:
    now = datetime.now(UTC)
    return DeliveryEnvelope(
        delivery_id=delivery_id_for(url, "redeliver"),
        destination="redeliver",
        kind="redeliver",
        redelivery=Redelivery(
            postback_url=url, application_id="1111", conversion_time=now, source="main"
        ),
        max_attempts=3,
        created_at=now,
    )


PRIVATE_URLS = [
    "http://127.0.0.1/pb?x=1",
    "http://127.0.0.1:8080/pb",
    "http://10.0.0.1/pb",
    "http://192.168.1.20/pb",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/pb",
    "http://[::ffff:127.0.0.1]/pb",
    "http://0.0.0.0/pb",
    "http://2130706433/pb",  # 127.0.0.1 written as one number
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_non_public_hosts_are_refused_by_default_and_allowed_with_allow_private(url: str) -> None:
    why = adapter().refusal(url)
    assert why is not None
    assert why.startswith("refused: host ")
    assert "non-public address" in why
    request = adapter().build_request(envelope_for(url))
    assert isinstance(request, PermanentFailure)
    assert request.reason == why

    assert adapter(allow_private=True).refusal(url) is None
    allowed = adapter(allow_private=True).build_request(envelope_for(url))
    assert isinstance(allowed, OutgoingRequest)
    assert (allowed.method, allowed.url) == ("GET", url)


@pytest.mark.parametrize(
    "url", ["ftp://pb.example.com/x", "file:///etc/passwd", "gopher://127.0.0.1/", "http:///nohost"]
)
def test_non_http_urls_are_refused_even_with_allow_private(url: str) -> None:
    for dest in (adapter(), adapter(allow_private=True)):
        why = dest.refusal(url)
        assert why == "refused: only http(s) URLs with a host are redelivered"


def test_public_address_is_allowed_and_sent_exactly() -> None:
    url = "http://93.184.215.14/pb?transaction_id=f2ae4254&event=New%20person"
    assert adapter().refusal(url) is None
    envelope = envelope_for(url)
    request = adapter().build_request(envelope)
    assert isinstance(request, OutgoingRequest)
    assert request.url == url
    assert request.body is None
    assert request.headers == {"X-Idempotency-Key": envelope.delivery_id}


def test_host_allowlist_restricts_hosts() -> None:
    dest = adapter(allow_private=True, host_allowlist=["partner.example", "127.0.0.1"])
    assert dest.refusal("http://partner.example/pb") is None
    assert dest.refusal("https://pb.partner.example/pb?x=1") is None
    assert dest.refusal("http://PB.Partner.Example/pb") is None
    assert dest.refusal("http://127.0.0.1:9000/pb") is None
    for url, host in (
        ("http://evilpartner.example/pb", "evilpartner.example"),
        ("http://partner.example.evil.test/pb", "partner.example.evil.test"),
        ("http://10.0.0.1/pb", "10.0.0.1"),
    ):
        assert dest.refusal(url) == f"refused: host {host} is not in host_allowlist"
    # the allow-list does not lift the private-address rule
    strict = adapter(host_allowlist=["127.0.0.1"])
    why = strict.refusal("http://127.0.0.1/pb")
    assert why is not None
    assert "non-public address" in why


def test_rate_limit_key_is_per_host() -> None:
    dest = adapter()
    key = lambda url: dest.rate_limit_key(envelope_for(url))  # noqa: E731
    assert key("https://a.example/pb?x=1") == "redeliver:a.example"
    assert key("https://A.Example:8443/other") == "redeliver:a.example"
    assert key("https://b.example/pb?x=1") == "redeliver:b.example"
    assert key("https://a.example/pb") != key("https://b.example/pb")
    assert dest.destination.rate_limit == "10/second"  # the default, per target host
