"""Failure tests for retries: flaky, throttling, slow, long-delayed, permanently failing and
always-failing destinations, against a real Redis, real worker processes and a real HTTP server.

Every test asserts counts (requests per idempotency key, dead letters, attempt records, what is
left in the queue, the delay set and kombu's unacked set). Time windows appear only as
correctness bounds, each with its tolerance stated where it is used.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from config.destinations import load_destinations
from config.keys import RedisKeys, queue_for
from config.settings import Settings
from producers.produce import Producer
from schemas.deadletter import DeadLetter
from schemas.envelope import delivery_id_for
from tests.conftest import WorkerProcess
from tests.helpers import wait_until
from workers.dev.receiver import Answer, PostbackReceiver, ReceivedRequest
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

KEYS = RedisKeys("pr")
QUEUE = queue_for("templated")
DELAYED = KEYS.delayed(QUEUE)
# kombu's Redis transport keeps delivered-but-unacked messages here (acks_late).
UNACKED = "unacked"
IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"

ProducerFactory = Callable[[Path], Producer]
WorkerFactory = Callable[..., WorkerProcess]


def install(n: int, prefix: str = "ev") -> dict[str, Any]:
    return {
        "event_id": f"{prefix}-{n}",
        "app_id": "123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T10:00:00Z",
        "install_time": "2026-11-22T09:59:00Z",
        "idfa": IDFA,
    }


def destination(
    name: str, url: str, retry: str = "", timeout: str = "", rate_limit: str = ""
) -> str:
    lines = [
        "[[destination]]",
        f'name = "{name}"',
        'kind = "templated"',
        f'url = "{url}"',
    ]
    lines += [line for line in (retry, timeout, rate_limit) if line]
    lines += ["[[destination.routes]]", 'type = "install"', ""]
    return "\n".join(lines)


def key_of(request: ReceivedRequest) -> str:
    return request.headers["X-Idempotency-Key"]


def idle(client: redis.Redis) -> bool:
    """Nothing pending anywhere: queue, delay set and kombu's unacked hash are all empty."""
    return (
        int(client.llen(QUEUE)) == 0
        and int(client.zcard(DELAYED)) == 0
        and int(client.hlen(UNACKED)) == 0
    )


def dead_letters(client: redis.Redis) -> list[DeadLetter]:
    return list(DeadLetterStore(client, KEYS).iter_entries())


def attempt_records(client: redis.Redis) -> list[dict[str, str]]:
    return list(AttemptLog(client, KEYS, 200_000).iter_records())


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def nesting_env(**values: float) -> dict[str, str]:
    return {f"POSTBACK_RELAY_{name}": str(value) for name, value in values.items()}


# --------------------------------------------------------------------------------------------
# 1. A destination that answers 500 for a while, then 200, next to a healthy one.
# --------------------------------------------------------------------------------------------

FLAKY_EVENTS = 200
FLAKY_MAX_ATTEMPTS = 4  # redeliveries after the first send: 5 HTTP attempts in all
FLAKY_MIN_FAILING = 2.5  # A answers 500 at least this long (after produce and after B is done)
FLAKY_MAX_FAILING = 30.0  # ...and at most this long after produce, whatever happens to B


@pytest.mark.timeout(90)
def test_flaky_destination_recovers_without_delaying_a_healthy_one(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: ProducerFactory,
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
) -> None:
    retry = (
        f"retry = {{ max_attempts = {FLAKY_MAX_ATTEMPTS}, schedule = [0.5, 0.5, 1, 1], "
        "jitter = 0, max_age_seconds = 600 }"
    )
    path = write_destinations(
        destination("flaky-a", f"{receiver.url}/a", retry)
        + destination("healthy-b", f"{receiver.url}/b", retry)
    )
    producer = make_producer(path)
    worker = start_worker(path, "--queues", "templated", "--concurrency", "4")

    a_ids = {delivery_id_for(f"ev-{i}", "flaky-a") for i in range(FLAKY_EVENTS)}
    b_ids = {delivery_id_for(f"ev-{i}", "healthy-b") for i in range(FLAKY_EVENTS)}
    lock = threading.Lock()
    state: dict[str, Any] = {"t0": None, "b_done_at": None, "a_healthy_at": None, "b_seen": set()}

    # A answers 500 until FLAKY_MIN_FAILING s after produce AND FLAKY_MIN_FAILING s after B has
    # every delivery, but never longer than FLAKY_MAX_FAILING s after produce. (On this machine
    # the 400-message backlog alone takes seconds, and retries queue behind it, so a fixed
    # 2-3 s window would be over before any retry ran.) "B complete before A's first 200"
    # therefore holds exactly when B was fully delivered within FLAKY_MAX_FAILING s while A
    # kept failing: B was not held back by A's failures.
    def respond(req: ReceivedRequest, seen: int) -> Answer:
        now = time.time()
        with lock:
            if req.path == "/b":
                state["b_seen"].add(key_of(req))
                if state["b_done_at"] is None and len(state["b_seen"]) >= FLAKY_EVENTS:
                    state["b_done_at"] = now
                return Answer(200)
            if state["a_healthy_at"] is None:
                b_done_at = state["b_done_at"]
                recovered = (
                    b_done_at is not None
                    and now >= state["t0"] + FLAKY_MIN_FAILING
                    and now >= b_done_at + FLAKY_MIN_FAILING
                )
                if recovered or now >= state["t0"] + FLAKY_MAX_FAILING:
                    state["a_healthy_at"] = now
            if state["a_healthy_at"] is None:
                return Answer(500, '{"error":"internal"}')
            return Answer(200)

    receiver.responder = respond
    state["t0"] = time.time()
    results = producer.produce_many(install(i) for i in range(FLAKY_EVENTS))
    assert sum(len(r.accepted) for r in results) == 2 * FLAKY_EVENTS

    def a_settled() -> bool:
        delivered = {key_of(r) for r in receiver.received("/a", ok_only=True)}
        dead = {e.delivery_id for e in dead_letters(redis_client)}
        return len(delivered | dead) >= FLAKY_EVENTS and idle(redis_client)

    assert wait_until(a_settled, 70, 0.25), worker.log()[-3000:]
    time.sleep(1.0)  # anything still on its way would arrive now

    a_requests = receiver.received("/a")
    b_requests = receiver.received("/b")

    # Every A delivery ended delivered or dead-lettered, never both, none pending.
    per_key_a: dict[str, list[ReceivedRequest]] = defaultdict(list)
    for r in a_requests:
        per_key_a[key_of(r)].append(r)
    assert set(per_key_a) == a_ids
    delivered_a = {k for k, rs in per_key_a.items() if any(r.status == 200 for r in rs)}
    entries = dead_letters(redis_client)
    dead_a = {e.delivery_id for e in entries if e.destination == "flaky-a"}
    assert {e.destination for e in entries} <= {"flaky-a"}, "a healthy delivery died"
    assert delivered_a.isdisjoint(dead_a)
    assert len(delivered_a) + len(dead_a) == FLAKY_EVENTS
    assert delivered_a | dead_a == a_ids
    assert idle(redis_client)

    # Requests per idempotency key never exceed 1 + max_attempts.
    counts_a = {k: len(rs) for k, rs in per_key_a.items()}
    assert max(counts_a.values()) <= 1 + FLAKY_MAX_ATTEMPTS, Counter(counts_a.values())
    for k in delivered_a:
        statuses = [r.status for r in sorted(per_key_a[k], key=lambda r: r.at)]
        assert statuses.count(200) == 1, (k, statuses)
        assert statuses[-1] == 200, (k, statuses)  # nothing sent after the success
    for k in dead_a:
        assert [r.status for r in per_key_a[k]] == [500] * (1 + FLAKY_MAX_ATTEMPTS)
    for e in entries:
        assert e.reason.startswith(
            f"attempts exhausted (first send + {FLAKY_MAX_ATTEMPTS} of {FLAKY_MAX_ATTEMPTS} "
            "retries)"
        )
    # A kept failing after B was done, so retries ran into failures too: some deliveries
    # needed more than one retry.
    assert max(counts_a.values()) >= 3, Counter(counts_a.values())

    # B: every delivery received (at least once), each a first-attempt success, none retried,
    # and all of them while A was still failing.
    per_key_b = Counter(key_of(r) for r in b_requests)
    assert set(per_key_b) == b_ids
    assert min(per_key_b.values()) >= 1
    assert {r.status for r in b_requests} == {200}
    a_healthy_at = state["a_healthy_at"]
    last_b = max(r.at for r in b_requests)
    first_a_ok = min((r.at for r in a_requests if r.status == 200), default=math.inf)
    assert last_b < first_a_ok
    assert a_healthy_at is None or last_b <= a_healthy_at
    assert last_b - state["t0"] < FLAKY_MAX_FAILING
    assert any(r.status == 500 and r.at < last_b for r in a_requests)

    # The attempt log has one record per HTTP request: 5xx as failed, 200 as sent.
    def records_complete() -> bool:
        return len(attempt_records(redis_client)) >= len(a_requests) + len(b_requests)

    assert wait_until(records_complete, 10)
    records = attempt_records(redis_client)
    by_dest = Counter((r["destination"], r["notifying_status"]) for r in records)
    assert by_dest[("healthy-b", "sent")] == len(b_requests)
    assert by_dest[("healthy-b", "failed")] == 0
    assert by_dest[("flaky-a", "sent")] == len(delivered_a)
    assert by_dest[("flaky-a", "failed")] == sum(1 for r in a_requests if r.status == 500)
    assert {r["attempt"] for r in records if r["destination"] == "healthy-b"} == {"1"}


# --------------------------------------------------------------------------------------------
# 2. 429 + Retry-After pauses the destination for every worker.
# --------------------------------------------------------------------------------------------

THROTTLE_EVENTS = 40
WORKERS = 2
CONCURRENCY = 4
# Each worker thread can have at most one request on the wire when the pause is written to
# Redis; after that every thread reads the pause before it sends. So at most WORKERS *
# CONCURRENCY requests can arrive between the first 429 and the pause taking effect: the first
# one (answered 429) plus one in flight on each of the other threads.
MAX_429 = WORKERS * CONCURRENCY
# Requests "already on the wire" may arrive a little after the 429 was answered: a thread that
# read "not paused" just before the pause was written still sends. The brief suggests 0.2 s;
# 0.5 s is used because the machine (2 cores) is shared with other test runs.
ON_THE_WIRE = 0.5


@pytest.mark.timeout(90)
@pytest.mark.parametrize("form", ["delta-seconds", "http-date"])
def test_429_retry_after_pauses_the_destination_across_workers(
    form: str,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: ProducerFactory,
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
) -> None:
    path = write_destinations(
        destination(
            "throttled",
            f"{receiver.url}/t",
            "retry = { max_attempts = 5, schedule = [0.5], jitter = 0, max_age_seconds = 600 }",
        )
    )
    producer = make_producer(path)
    workers = [
        start_worker(
            path,
            "--queues",
            "templated",
            "--concurrency",
            str(CONCURRENCY),
            "--hostname",
            f"w{n}@%h",
        )
        for n in range(1, WORKERS + 1)
    ]

    lock = threading.Lock()
    state: dict[str, Any] = {"first_at": None, "retry_at": None, "header": None}

    # The partner throttles: the first request gets 429 + Retry-After (3 s); every request that
    # arrives before that time gets 429 too (pointing at the same time); then 200.
    def respond(req: ReceivedRequest, seen: int) -> Answer:
        with lock:
            if state["first_at"] is None:
                state["first_at"] = req.at
                if form == "delta-seconds":
                    state["header"] = "3"
                    state["retry_at"] = req.at + 3
                else:
                    header = formatdate(req.at + 3, usegmt=True)
                    state["header"] = header
                    # whole seconds: the date may be up to 1 s earlier than at + 3
                    state["retry_at"] = parsedate_to_datetime(header).timestamp()
            retry_at = state["retry_at"]
            if req.at < retry_at:
                if form == "delta-seconds":
                    header = str(max(1, math.ceil(retry_at - req.at)))
                else:
                    header = state["header"]
                return Answer(429, '{"error":"slow down"}', {"Retry-After": header})
        return Answer(200)

    receiver.responder = respond
    results = producer.produce_many(install(i, "thr") for i in range(THROTTLE_EVENTS))
    ids = {i for r in results for i in r.accepted}
    assert len(ids) == THROTTLE_EVENTS

    def all_delivered() -> bool:
        ok = {key_of(r) for r in receiver.received("/t", ok_only=True)}
        return ok >= ids and idle(redis_client)

    assert wait_until(all_delivered, 45, 0.2), "\n".join(w.log()[-2000:] for w in workers)
    time.sleep(1.0)

    got = receiver.received("/t")
    first_at, retry_at = state["first_at"], state["retry_at"]
    assert retry_at - first_at >= 2.0  # both forms: a real pause to look into
    # No request reaches the destination between the 429 (+ on-the-wire tolerance) and the
    # Retry-After time.
    inside = [r for r in got if first_at + ON_THE_WIRE < r.at < retry_at]
    assert inside == [], [(round(r.at - first_at, 3), r.status) for r in inside]

    statuses = Counter(r.status for r in got)
    assert set(statuses) <= {200, 429}
    assert 1 <= statuses[429] <= MAX_429, statuses
    # Every 429 came from a request already on the wire when the pause began.
    assert all(r.at <= first_at + ON_THE_WIRE for r in got if r.status == 429)

    # Every event eventually delivered, exactly one success each, nothing left anywhere.
    ok_per_key = Counter(key_of(r) for r in got if r.status == 200)
    assert set(ok_per_key) == ids
    assert set(ok_per_key.values()) == {1}
    assert len(got) == THROTTLE_EVENTS + statuses[429]
    assert dead_letters(redis_client) == []
    assert idle(redis_client)

    # Both workers took part: each delivered some, and each deferred some deliveries because
    # it read the destination's pause (one process's 429 paused the other process too).
    lines_per_worker = [json_lines(w.log()) for w in workers]
    delivered_per_worker = [
        sum(1 for line in lines if line.get("event") == "delivery.delivered")
        for lines in lines_per_worker
    ]
    deferred_per_worker = [
        sum(
            1
            for line in lines
            if line.get("event") == "delivery.deferred"
            and "destination paused" in str(line.get("reason"))
        )
        for lines in lines_per_worker
    ]
    assert sum(delivered_per_worker) == THROTTLE_EVENTS, delivered_per_worker
    assert all(n > 0 for n in delivered_per_worker), delivered_per_worker
    assert all(n > 0 for n in deferred_per_worker), deferred_per_worker


# --------------------------------------------------------------------------------------------
# 3. An endpoint slower than the timeout.
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_endpoint_slower_than_the_timeout_is_retried_within_the_task_limits(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: ProducerFactory,
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
) -> None:
    path = write_destinations(
        destination(
            "slow",
            f"{receiver.url}/slow",
            "retry = { max_attempts = 3, schedule = [0.5, 0.5], jitter = 0, max_age_seconds = 600 }",
            "timeout = { connect = 1, read = 1 }",
        )
    )
    producer = make_producer(path)
    worker = start_worker(
        path,
        env=nesting_env(
            HTTP_CONNECT_TIMEOUT=1,
            HTTP_READ_TIMEOUT=1,
            TASK_SOFT_TIME_LIMIT=4,
            TASK_TIME_LIMIT=6,
            VISIBILITY_TIMEOUT=8,
        ),
    )
    receiver.responder = lambda req, seen: Answer(200, delay=3.0) if seen < 2 else Answer(200)
    (delivery_id,) = producer.produce(install(1, "slow")).accepted

    # The first two requests are recorded only after their 3 s sleep; count arrivals instead.
    assert wait_until(lambda: receiver.counts["/slow"] >= 3, 30), worker.log()[-3000:]
    assert wait_until(lambda: len(receiver.received("/slow")) >= 3, 10)
    third_at = max(r.at for r in receiver.received("/slow"))
    # Wait past the visibility timeout (8 s): a message still unacked would come back now.
    while time.time() < third_at + 10:
        time.sleep(0.25)

    got = receiver.received("/slow")
    assert receiver.counts["/slow"] == 3
    assert len(got) == 3
    assert {key_of(r) for r in got} == {delivery_id}
    assert dead_letters(redis_client) == []
    assert idle(redis_client)

    log = worker.log()
    for marker in ("TimeLimitExceeded", "Hard time limit", "SoftTimeLimitExceeded"):
        assert marker not in log

    records = sorted(
        (r for r in attempt_records(redis_client) if r["delivery_id"] == delivery_id),
        key=lambda r: int(r["attempt"]),
    )
    assert [(r["attempt"], r["notifying_status"]) for r in records] == [
        ("1", "failed"),
        ("2", "failed"),
        ("3", "sent"),
    ]
    for failed in records[:2]:
        assert "timeout" in failed["error"].lower(), failed
        assert failed["response_code"] == ""
        # Cut by the 1 s read timeout, well before the 4 s soft limit (0.2 s tolerance below).
        assert 800 <= float(failed["duration_ms"]) < 4000, failed
    assert records[2]["response_code"] == "200"


# --------------------------------------------------------------------------------------------
# 4. A retry delay longer than the visibility timeout is delivered exactly once.
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("batch_size", [1, 10])
def test_retry_delay_longer_than_visibility_timeout_is_delivered_once(
    batch_size: int,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    redis_url: str,
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
) -> None:
    retry_delay = 8.0
    # With batches: three deliveries go out in one message, and their retries come back
    # from the delay set in one (the mover groups them).
    count = 1 if batch_size == 1 else 3
    path = write_destinations(
        destination(
            "later",
            f"{receiver.url}/later" + ("" if count == 1 else "/(event_id)"),
            f"retry = {{ max_attempts = 2, schedule = [{retry_delay}], jitter = 0, max_age_seconds = 600 }}",
            "timeout = { connect = 1, read = 1 }",
        )
    )
    settings = Settings(redis_url=redis_url, destinations_file=path, batch_size=batch_size)
    producer = Producer(settings, load_destinations(path), redis_client)
    worker = start_worker(
        path,
        env=nesting_env(
            VISIBILITY_TIMEOUT=5,
            HTTP_CONNECT_TIMEOUT=1,
            HTTP_READ_TIMEOUT=1,
            TASK_SOFT_TIME_LIMIT=3,
            TASK_TIME_LIMIT=4,
            BATCH_SIZE=batch_size,
        ),
    )
    receiver.responder = lambda req, seen: Answer(503, "busy") if seen == 0 else Answer(200)
    results = producer.produce_many(install(n, "later") for n in range(count))
    delivery_ids = {d for r in results for d in r.accepted}
    assert len(delivery_ids) == count

    first = receiver.wait_for(count, timeout=20)
    assert len(first) == count, worker.log()[-3000:]
    first_at = max(r.at for r in first)

    # While the retry waits, it sits in the delay set: not on the queue, not unacked in a worker.
    parked_checks = 0
    while time.time() < first_at + retry_delay - 1.5:
        if (
            int(redis_client.zcard(DELAYED)) == count
            and int(redis_client.llen(QUEUE)) == 0
            and int(redis_client.hlen(UNACKED)) == 0
        ):
            parked_checks += 1
        time.sleep(0.25)
    assert parked_checks > 0, worker.log()[-3000:]

    # Wait well past the retry and past two visibility timeouts after it.
    while time.time() < first_at + 20:
        time.sleep(0.25)

    assert len(receiver.requests) == 2 * count, worker.log()[-3000:]
    for request_path in {r.path for r in receiver.requests}:
        got = receiver.received(request_path)
        assert [r.status for r in got] == [503, 200], worker.log()[-3000:]
        assert receiver.counts[request_path] == 2
        assert len({key_of(r) for r in got}) == 1
        assert got[1].at - got[0].at >= retry_delay
    assert {key_of(r) for r in receiver.requests} == delivery_ids
    assert dead_letters(redis_client) == []
    assert idle(redis_client)
    for delivery_id in delivery_ids:
        records = [r for r in attempt_records(redis_client) if r["delivery_id"] == delivery_id]
        assert sorted((r["attempt"], r["notifying_status"]) for r in records) == [
            ("1", "failed"),
            ("2", "sent"),
        ]


# --------------------------------------------------------------------------------------------
# 5. Permanent failures.
# --------------------------------------------------------------------------------------------

PERMANENT = (400, 404, 410, 401, 403)
ALARMING = {401, 403}


def _wait_dead(client: redis.Redis, count: int, timeout: float) -> list[DeadLetter]:
    wait_until(lambda: DeadLetterStore(client, KEYS).count() >= count, timeout)
    return dead_letters(client)


@pytest.mark.timeout(60)
def test_permanent_4xx_is_dead_lettered_after_one_request_and_auth_failures_alarm(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: ProducerFactory,
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
) -> None:
    retry = "retry = { max_attempts = 3, schedule = [0.2], jitter = 0, max_age_seconds = 600 }"
    path = write_destinations(
        "".join(
            destination(f"perm-{code}", f"{receiver.url}/status/{code}", retry)
            for code in PERMANENT
        )
    )
    producer = make_producer(path)
    worker = start_worker(path)

    def respond(req: ReceivedRequest, seen: int) -> Answer:
        code = int(req.path.rsplit("/", 1)[1])
        return Answer(code, f'{{"error":"partner says {code} for this postback"}}')

    receiver.responder = respond
    result = producer.produce(install(1, "perm"))
    assert len(result.accepted) == len(PERMANENT)

    entries = _wait_dead(redis_client, len(PERMANENT), 20)
    assert len(entries) == len(PERMANENT), worker.log()[-3000:]
    time.sleep(1.0)  # a retry, if one were scheduled, would have been sent by now

    by_dest = {e.destination: e for e in entries}
    for code in PERMANENT:
        name = f"perm-{code}"
        entry = by_dest[name]
        assert entry.delivery_id == delivery_id_for("perm-1", name)
        assert entry.status == code
        assert entry.reason == f"HTTP {code}"
        assert f"partner says {code} for this postback" in entry.body_excerpt
        assert entry.envelope is not None
        assert len(entry.envelope.history) == 1
        assert entry.envelope.history[0].status == code
        requests_for = receiver.received(f"/status/{code}")
        assert len(requests_for) == 1, (code, len(requests_for))
    assert receiver.counts.total() == len(PERMANENT)
    assert idle(redis_client)

    records = attempt_records(redis_client)
    assert len(records) == len(PERMANENT)
    assert {r["notifying_status"] for r in records} == {"failed"}

    # 401 and 403 raise an alarm naming the destination; the other 4xx do not.
    alarms = [line for line in json_lines(worker.log()) if line.get("alarm") is True]
    alarmed = Counter(line.get("destination") for line in alarms)
    assert set(alarmed) == {f"perm-{code}" for code in ALARMING}, alarms
    assert all(n >= 1 for n in alarmed.values())


# --------------------------------------------------------------------------------------------
# 6. Attempts never exceed the policy when everything fails.
# --------------------------------------------------------------------------------------------

EXHAUST_EVENTS = 5


@pytest.mark.timeout(60)
def test_attempts_never_exceed_the_policy_when_everything_fails(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: ProducerFactory,
    start_worker: WorkerFactory,
    redis_client: redis.Redis,
) -> None:
    path = write_destinations(
        destination(
            "down",
            f"{receiver.url}/down",
            "retry = { max_attempts = 2, schedule = [0.3, 0.3], jitter = 0, max_age_seconds = 600 }",
        )
    )
    producer = make_producer(path)
    worker = start_worker(path)
    receiver.responder = lambda req, seen: Answer(503, '{"error":"down for maintenance"}')
    results = producer.produce_many(install(i, "down") for i in range(EXHAUST_EVENTS))
    ids = {i for r in results for i in r.accepted}
    assert len(ids) == EXHAUST_EVENTS

    entries = _wait_dead(redis_client, EXHAUST_EVENTS, 30)
    assert len(entries) == EXHAUST_EVENTS, worker.log()[-3000:]
    time.sleep(1.5)  # longer than the whole schedule: no request may follow the dead letter

    per_key = Counter(key_of(r) for r in receiver.received("/down"))
    assert per_key == dict.fromkeys(ids, 3)
    assert {e.delivery_id for e in entries} == ids
    for entry in entries:
        assert entry.reason.startswith("attempts exhausted (first send + 2 of 2 retries)"), (
            entry.reason
        )
        assert entry.status == 503
        assert "down for maintenance" in entry.body_excerpt
        assert entry.envelope is not None
        assert len(entry.envelope.history) == 3
        assert [h.status for h in entry.envelope.history] == [503, 503, 503]
    assert idle(redis_client)
    records = attempt_records(redis_client)
    assert len(records) == 3 * EXHAUST_EVENTS
    assert Counter(r["attempt"] for r in records) == {"1": 5, "2": 5, "3": 5}
