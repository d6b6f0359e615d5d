"""Reliability building blocks against a real Redis, no worker processes: Retry-After parsing,
answer classification, the delay-set mover, the dead-letter store, pauses and the global limiter."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from config.destinations import parse_destinations
from config.keys import RedisKeys, queue_for
from schemas.deadletter import DeadLetter
from schemas.envelope import DeliveryEnvelope, delivery_id_for
from schemas.event import ConversionEvent
from schemas.outcomes import Delivered, PermanentFailure, RetryLater
from tests.helpers import net_destination_toml
from workers.broker.wire import decode_task_args
from workers.delivery import pacing
from workers.delivery.http import HttpAnswer, HttpFailure, retry_after_seconds
from workers.delivery.pipeline import DeliveryPipeline
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.dev.receiver import Answer, PostbackReceiver
from workers.kinds.templated.adapter import TemplatedAdapter
from workers.runtime import WorkerRuntime
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet

KEYS = RedisKeys("pr")
QUEUE = queue_for("templated")


# --- Retry-After -----------------------------------------------------------------------------


def test_retry_after_delta_seconds() -> None:
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(" 7 ") == 7.0
    assert retry_after_seconds("0") == 0.0


def test_retry_after_http_date_in_the_future_and_past() -> None:
    now = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
    future = format_datetime(now + timedelta(seconds=90), usegmt=True)
    past = format_datetime(now - timedelta(hours=1), usegmt=True)
    assert future.endswith("GMT")
    assert retry_after_seconds(future, now=now) == 90.0
    assert retry_after_seconds(past, now=now) == 0.0
    # Without an explicit now, a date 1 h ahead is about 3600 s away.
    ahead = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    seconds = retry_after_seconds(ahead)
    assert seconds is not None
    assert 3500 < seconds <= 3600


@pytest.mark.parametrize("value", [None, "", "soon", "Someday, 99 Foo 2026", "1.5e3", "-5"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert retry_after_seconds(value) is None


# --- classify --------------------------------------------------------------------------------


@pytest.fixture
def adapter() -> TemplatedAdapter:
    destinations = parse_destinations(
        {
            "destination": [
                {
                    "name": "net",
                    "kind": "templated",
                    "url": "https://pb.example.com/i?idfa=(idfa)",
                    "routes": [{"type": "install"}],
                }
            ]
        }
    ).with_secrets({}, kinds=["templated"])
    dest = destinations.get("net")
    return TemplatedAdapter(dest)  # type: ignore[arg-type]


def response(status: int, headers: dict[str, str] | None = None) -> HttpAnswer:
    return HttpAnswer.of(status, headers or {})


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_classify_2xx_is_delivered(adapter: TemplatedAdapter, status: int) -> None:
    outcome = adapter.classify(response(status), "ok")
    assert outcome == Delivered(status, "ok")


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_classify_transient_statuses_retry_later(adapter: TemplatedAdapter, status: int) -> None:
    outcome = adapter.classify(response(status), "busy")
    assert isinstance(outcome, RetryLater)
    assert outcome.status == status
    assert outcome.reason == f"HTTP {status}"
    assert outcome.body_excerpt == "busy"
    assert outcome.after is None


def test_classify_429_carries_retry_after(adapter: TemplatedAdapter) -> None:
    outcome = adapter.classify(response(429, {"Retry-After": "30"}), "")
    assert isinstance(outcome, RetryLater)
    assert outcome.after == 30.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    outcome = adapter.classify(response(503, {"retry-after": when}), "")
    assert isinstance(outcome, RetryLater)
    assert outcome.after is not None
    assert 100 < outcome.after <= 120


@pytest.mark.parametrize("status", [400, 404, 410, 422])
def test_classify_other_4xx_is_permanent_without_alarm(
    adapter: TemplatedAdapter, status: int
) -> None:
    outcome = adapter.classify(response(status), "bad app id")
    assert outcome == PermanentFailure(f"HTTP {status}", status, "bad app id", alarm=False)


@pytest.mark.parametrize("status", [401, 403])
def test_classify_auth_failures_are_permanent_with_alarm(
    adapter: TemplatedAdapter, status: int
) -> None:
    outcome = adapter.classify(response(status), "")
    assert isinstance(outcome, PermanentFailure)
    assert outcome.status == status
    assert outcome.alarm is True


@pytest.mark.parametrize(
    "exc",
    [
        HttpFailure("timeout", "Timeout"),
        HttpFailure("timeout", "ConnectTimeout"),
        HttpFailure("timeout", "ReadTimeout"),
        HttpFailure("connection", "ConnectionError"),
    ],
)
def test_classify_error_timeouts_and_connection_errors_retry(
    adapter: TemplatedAdapter, exc: HttpFailure
) -> None:
    outcome = adapter.classify_error(exc)
    assert isinstance(outcome, RetryLater)
    assert outcome.status is None
    assert exc.name in outcome.reason


# --- DelaySet --------------------------------------------------------------------------------


def test_delay_set_moves_only_due_items(redis_client: redis.Redis) -> None:
    delays = DelaySet(redis_client, KEYS)
    now = 1_000_000.0
    delays.schedule(QUEUE, "due-1", now - 5)
    delays.schedule(QUEUE, "due-2", now)
    delays.schedule(QUEUE, "later", now + 30)
    assert delays.depth(QUEUE) == 3
    assert delays.next_due(QUEUE) == now - 5

    assert delays.move_due([QUEUE], now=now) == 2
    assert sorted(redis_client.lrange(QUEUE, 0, -1)) == [b"due-1", b"due-2"]
    assert delays.depth(QUEUE) == 1
    assert delays.next_due(QUEUE) == now + 30
    assert delays.move_due([QUEUE], now=now + 29) == 0
    assert redis_client.llen(QUEUE) == 2
    assert delays.move_due([QUEUE], now=now + 30) == 1
    assert redis_client.llen(QUEUE) == 3
    assert delays.depth(QUEUE) == 0
    assert delays.next_due(QUEUE) is None


def test_due_items_go_ahead_of_the_queues_backlog_the_earliest_first(
    redis_client: redis.Redis,
) -> None:
    # A delivery back for its reserved send time must not wait behind a burst of new ones: it
    # would miss its slot and reserve again (workers take from the right end: BRPOP).
    delays = DelaySet(redis_client, KEYS)
    now = 1_000_000.0
    redis_client.lpush(QUEUE, "backlog-1", "backlog-2")
    delays.schedule(QUEUE, "due-second", now - 1)
    delays.schedule(QUEUE, "due-first", now - 2)
    assert delays.move_due([QUEUE], now=now) == 2
    taken = [redis_client.rpop(QUEUE) for _ in range(4)]
    assert taken == [b"due-first", b"due-second", b"backlog-1", b"backlog-2"]


def test_racing_movers_publish_each_item_exactly_once(
    redis_client: redis.Redis, redis_url: str
) -> None:
    total, movers = 5000, 8
    key = KEYS.delayed(QUEUE)
    now = time.time()
    with redis_client.pipeline(transaction=False) as pipe:
        for start in range(0, total, 500):
            pipe.zadd(key, {f"msg-{i}": now - 1 - i / total for i in range(start, start + 500)})
        pipe.execute()
    assert redis_client.zcard(key) == total

    moved_by: list[int] = [0] * movers
    errors: list[BaseException] = []
    go = threading.Barrier(movers)

    def mover(index: int) -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            delays = DelaySet(client, KEYS)
            go.wait()
            while True:
                moved = delays.move_due([QUEUE], limit=50)
                moved_by[index] += moved
                if moved == 0 and client.zcard(key) == 0:
                    return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(movers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert not any(t.is_alive() for t in threads)

    published = redis_client.lrange(QUEUE, 0, -1)
    assert len(published) == total
    assert len(set(published)) == total
    assert set(published) == {f"msg-{i}".encode() for i in range(total)}
    assert sum(moved_by) == total
    assert sum(1 for m in moved_by if m > 0) >= 2  # the movers did race
    assert redis_client.zcard(key) == 0


# --- DeadLetterStore -------------------------------------------------------------------------


def envelope(event_id: str, destination: str = "net", attempts: int = 1) -> DeliveryEnvelope:
    event = ConversionEvent.parse(
        {
            "event_id": event_id,
            "app_id": "com.example.game",
            "platform": "android",
            "event_name": "install",
            "event_time": "2026-11-22T10:00:00Z",
        }
    )
    return DeliveryEnvelope(
        delivery_id=delivery_id_for(event_id, destination),
        destination=destination,
        kind="templated",
        event=event,
        attempt=attempts,
        max_attempts=attempts,
        created_at=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
    )


def entry(
    event_id: str,
    destination: str = "net",
    reason: str = "HTTP 400",
    dead_at: datetime | None = None,
) -> DeadLetter:
    env = envelope(event_id, destination)
    return DeadLetter(
        delivery_id=env.delivery_id,
        destination=destination,
        reason=reason,
        status=400,
        dead_at=dead_at or datetime.now(UTC),
        envelope=env,
    )


def test_dead_letter_store_add_get_count(redis_client: redis.Redis) -> None:
    store = DeadLetterStore(redis_client, KEYS)
    assert store.count() == 0
    assert store.counts_by_destination() == {}

    first = store.add_envelope(envelope("e1"), "HTTP 400", 400, '{"error":"bad"}')
    store.add(entry("e2"))
    store.add(entry("e3", destination="other"))
    assert store.count() == 3
    assert store.counts_by_destination() == {"net": 2, "other": 1}

    got = store.get(first.delivery_id)
    assert got == first
    assert got is not None
    assert got.envelope is not None
    assert got.envelope.event.event_id == "e1"
    assert got.body_excerpt == '{"error":"bad"}'
    assert store.get("no-such-id") is None

    # Adding the same delivery again replaces it and does not count it twice.
    store.add(entry("e2", reason="HTTP 404"))
    assert store.count() == 3
    assert store.counts_by_destination() == {"net": 2, "other": 1}
    again = store.get(delivery_id_for("e2", "net"))
    assert again is not None
    assert again.reason == "HTTP 404"


def test_replay_one_twice_enqueues_once(redis_client: redis.Redis) -> None:
    store = DeadLetterStore(redis_client, KEYS)
    dead = entry("e1")
    store.add(dead)
    store.add(entry("e2"))
    assert dead.envelope is not None

    assert store.replay_one(dead, dead.envelope, "wire-message-1") is True
    assert store.replay_one(dead, dead.envelope, "wire-message-2") is False
    assert redis_client.lrange(QUEUE, 0, -1) == [b"wire-message-1"]
    assert store.get(dead.delivery_id) is None
    assert store.count() == 1
    assert store.counts_by_destination() == {"net": 1}


def test_remove_keeps_counts_consistent(redis_client: redis.Redis) -> None:
    store = DeadLetterStore(redis_client, KEYS)
    entries = [entry(f"e{i}", destination="net" if i % 2 else "other") for i in range(6)]
    for e in entries:
        store.add(e)
    assert store.counts_by_destination() == {"net": 3, "other": 3}

    assert store.remove(entries[1]) is True
    assert store.remove(entries[1]) is False  # a second removal changes nothing
    assert store.remove(entries[0]) is True
    assert store.count() == 4
    assert store.counts_by_destination() == {"net": 2, "other": 2}
    assert len(list(store.iter_entries())) == 4

    for e in entries:
        store.remove(e)
    assert store.count() == 0
    assert store.counts_by_destination() == {}
    assert list(store.iter_entries()) == []
    assert redis_client.llen(QUEUE) == 0


def test_iter_entries_filters_by_destination_reason_and_since(redis_client: redis.Redis) -> None:
    store = DeadLetterStore(redis_client, KEYS)
    base = datetime.now(UTC) - timedelta(hours=3)
    store.add(entry("old", "net", "HTTP 400", base))
    store.add(
        entry("mid", "other", "attempts exhausted (3 of 3): HTTP 503", base + timedelta(hours=1))
    )
    store.add(
        entry(
            "new",
            "net",
            "attempts exhausted (2 of 2): timeout (ReadTimeout)",
            base + timedelta(hours=2),
        )
    )

    def ids(entries: object) -> list[str]:
        return [e.envelope.event.event_id for e in entries]  # type: ignore[attr-defined]

    assert ids(store.iter_entries()) == ["old", "mid", "new"]  # oldest first
    assert ids(store.iter_entries(destination="net")) == ["old", "new"]
    assert ids(store.iter_entries(destination="other")) == ["mid"]
    assert ids(store.iter_entries(destination="nobody")) == []
    assert ids(store.iter_entries(reason="ATTEMPTS EXHAUSTED")) == ["mid", "new"]
    assert ids(store.iter_entries(reason="http 503")) == ["mid"]
    since = (base + timedelta(minutes=30)).timestamp()
    assert ids(store.iter_entries(since=since)) == ["mid", "new"]
    assert ids(store.iter_entries(since=since, destination="net")) == ["new"]
    assert ids(store.iter_entries(since=time.time() + 60)) == []


def test_iter_entries_pages_through_many(redis_client: redis.Redis) -> None:
    store = DeadLetterStore(redis_client, KEYS)
    base = datetime.now(UTC) - timedelta(hours=1)
    for i in range(450):
        store.add(entry(f"e{i:03}", dead_at=base + timedelta(seconds=i)))
    got = list(store.iter_entries())
    assert len(got) == 450
    assert [e.envelope.event.event_id for e in got if e.envelope] == [
        f"e{i:03}" for i in range(450)
    ]


def test_reason_category_groups_particulars(redis_client: redis.Redis) -> None:
    store = DeadLetterStore(redis_client, KEYS)
    reasons = [
        "attempts exhausted (3 of 3): HTTP 503",
        "attempts exhausted (2 of 2): timeout (ReadTimeout)",
        "HTTP 400",
        "HTTP 400",
        "max age would pass before the next retry: HTTP 500",
    ]
    entries = [entry(f"e{i}", reason=r) for i, r in enumerate(reasons)]
    assert entries[0].reason_category == "attempts exhausted"
    assert entries[2].reason_category == "HTTP 400"
    assert store.counts_by_reason(entries) == {
        "attempts exhausted": 2,
        "HTTP 400": 2,
        "max age would pass before the next retry": 1,
    }


# --- PauseRegistry and GlobalRateLimiter -----------------------------------------------------


@pytest.fixture(params=["real", "fake"])
def pause_backend(request: pytest.FixtureRequest, redis_client: redis.Redis) -> redis.Redis:
    """PauseRegistry is GET/DEL and one Lua script: the same tests run on real Redis and on
    fakeredis (with Lua)."""
    if request.param == "fake":
        return fakeredis.FakeRedis()
    return redis_client


def test_pause_paused_until_and_resume(pause_backend: redis.Redis) -> None:
    pauses = PauseRegistry(pause_backend, KEYS)
    assert pauses.paused_until("net") is None
    before = time.time()
    pauses.pause("net", 30, "429 Retry-After")
    until = pauses.paused_until("net")
    assert until is not None
    assert before + 30 <= until <= time.time() + 30
    assert pauses.paused_until("other") is None
    ttl = pause_backend.pttl(KEYS.paused("net"))
    assert 25_000 < ttl <= 30_001

    assert pauses.resume("net") is True
    assert pauses.paused_until("net") is None
    assert pauses.resume("net") is False


def test_shorter_pause_never_shortens_a_longer_one(pause_backend: redis.Redis) -> None:
    pauses = PauseRegistry(pause_backend, KEYS)
    pauses.pause("net", 60, "operator")
    long_until = pauses.paused_until("net")
    assert long_until is not None
    pauses.pause("net", 2, "429 Retry-After: 2")
    assert pauses.paused_until("net") == long_until
    assert pause_backend.pttl(KEYS.paused("net")) > 50_000
    # A longer pause does extend it.
    pauses.pause("net", 120, "operator")
    extended = pauses.paused_until("net")
    assert extended is not None
    assert extended > long_until + 50


class ReadThenInterleave:
    """A client whose every GET is followed, once, by another worker's call: what happens when a
    pause is read and written in two steps and another worker writes in between."""

    def __init__(self, client: redis.Redis, between: Callable[[], object]) -> None:
        self._client = client
        self._between: Callable[[], object] | None = between

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        value = self._client.get(*args, **kwargs)
        self.interleave()
        return value

    def interleave(self) -> None:
        between, self._between = self._between, None
        if between is not None:
            between()


def test_a_longer_pause_set_by_another_worker_meanwhile_is_never_shortened(
    pause_backend: redis.Redis,
) -> None:
    other_worker = PauseRegistry(pause_backend, KEYS)
    client = ReadThenInterleave(
        pause_backend, lambda: other_worker.pause("net", 300, "401 from another worker")
    )
    pauses = PauseRegistry(client, KEYS)  # type: ignore[arg-type]
    pauses.pause("net", 5, "429 Retry-After: 5")
    client.interleave()  # set in one step: the other worker's pause simply comes after it
    until = other_worker.paused_until("net")
    assert until is not None
    assert until > time.time() + 250
    assert pause_backend.pttl(KEYS.paused("net")) > 250_000


def net_destination(tmp_path: Path, receiver: PostbackReceiver) -> Path:
    """A destinations file with one templated destination, "net", at ``receiver``."""
    path = tmp_path / "destinations.toml"
    path.write_text(f"""
[[destination]]
name = "net"
kind = "templated"
url = "{receiver.url}/pb"
[[destination.routes]]
type = "install"
""")
    return path


def test_a_429_pauses_its_destination_first_thing_after_the_answer_in_one_command(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    tmp_path: Path,
    make_runtime: Callable[[Path], WorkerRuntime],
) -> None:
    receiver.responder = lambda req, seen: Answer(429, headers={"Retry-After": "30"})
    pipeline = make_runtime(net_destination(tmp_path, receiver)).pipeline
    pipeline.pauses.pause("warm-up", 0.01, "loads the script")
    delivery = envelope("e-429").model_copy(update={"attempt": 0, "max_attempts": 3})
    pause_key = KEYS.paused("net")
    with redis_client.monitor() as monitor:
        result = pipeline.run(delivery)
        redis_client.echo("end of test")
        commands: list[str] = []
        while "end of test" not in (command := monitor.next_command())["command"]:
            if command["client_type"] != "lua":  # not the commands a script ran
                commands.append(command["command"])
    assert result.status == "retry_scheduled", result
    # Before the send, the pipeline reads the pause once (not paused); the next command after
    # the answer is the pause itself, one script call that keeps the later pause.
    read_before_send = commands.index(f"GET {pause_key}")
    after_answer = commands[read_before_send + 1 :]
    assert after_answer[0].startswith("EVALSHA ")
    assert pause_key in after_answer[0].split()
    assert [c for c in after_answer[1:] if pause_key in c.split()] == []
    until = pipeline.pauses.paused_until("net")
    assert until is not None
    assert until > time.time() + 25


def test_pause_expires(pause_backend: redis.Redis) -> None:
    pauses = PauseRegistry(pause_backend, KEYS)
    pauses.pause("net", 0.3, "short")
    assert pauses.paused_until("net") is not None
    deadline = time.monotonic() + 5
    while pauses.paused_until("net") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pauses.paused_until("net") is None


def test_rate_limiter_reserves_times_one_interval_apart_so_the_sixth_waits_a_second(
    redis_client: redis.Redis, redis_url: str
) -> None:
    import limits

    limiter = GlobalRateLimiter(redis.Redis.from_url(redis_url), KEYS)
    item = limits.parse("5/second")
    reserved = [limiter.reserve("net", item) for _ in range(6)]
    times = [r.send_at for r in reserved if r is not None]
    assert len(times) == 6
    # The first goes at once, each next one 200 ms (1 s / 5) after it: five in any second.
    assert reserved[0] is not None
    assert reserved[0].wait == 0
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [0.2] * 5
    sixth = reserved[5]
    assert sixth is not None
    assert 0.9 < sixth.wait <= 1.0
    # Other destinations have their own schedules.
    other = limiter.reserve("other", item)
    replay = limiter.reserve("replay:net", item)
    assert other is not None
    assert other.wait == 0
    assert replay is not None
    assert replay.wait == 0
    # No limit configured: nothing to reserve, no wait.
    assert all(limiter.reserve("net", None) is None for _ in range(20))
    # A second limiter (another worker process) shares the same schedule.
    other_process = GlobalRateLimiter(redis.Redis.from_url(redis_url), KEYS)
    seventh = other_process.reserve("net", item)
    assert seventh is not None
    assert round(seventh.send_at - sixth.send_at, 6) == 0.2
    # Once the schedule has run out, a request goes at once again.
    time.sleep(seventh.wait + 0.25)
    again = limiter.reserve("net", item)
    assert again is not None
    assert again.wait == 0
    # Redis's clock: what a parked delivery compares its reserved time with.
    assert abs(limiter.now() - time.time()) < 0.5


def limited_net_pipeline(
    make_runtime: Callable[[Path], WorkerRuntime],
    tmp_path: Path,
    receiver: PostbackReceiver,
    settings: str,
) -> DeliveryPipeline:
    """A worker's pipeline with one destination, "net", with these settings (its rate limit)."""
    toml = net_destination_toml(receiver.url).replace(
        "[[destination.routes]]", f"{settings}\n[[destination.routes]]"
    )
    path = tmp_path / "destinations.toml"
    path.write_text(toml)
    return make_runtime(path).pipeline


def count_reservations(pipeline: DeliveryPipeline) -> list[Any]:
    """Every reservation ``pipeline``'s limiter takes from now on, in order."""
    reserve = pipeline.limiter.reserve
    reservations: list[Any] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        reservations.append(reserve(*args, **kwargs))
        return reservations[-1]

    pipeline.limiter.reserve = counted  # type: ignore[method-assign]
    return reservations


def test_pipeline_sleeps_a_short_wait_and_parks_a_long_one_once_with_its_reservation(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    tmp_path: Path,
    make_runtime: Callable[[Path], WorkerRuntime],
) -> None:
    pipeline = limited_net_pipeline(make_runtime, tmp_path, receiver, 'rate_limit = "2/second"')
    slept: list[float] = []
    pipeline.turns.sleep = slept.append  # the greenlet's sleep, recorded instead of slept
    reservations = count_reservations(pipeline)
    first = [pipeline.run(envelope(f"rl-{i}").model_copy(update={"attempt": 0})) for i in range(3)]
    # 0 s, 0.5 s and 1 s away (one emission interval of 1 s / 2 apart): the last two waited
    # in the worker (<= POSTBACK_RELAY_RATE_LIMIT_MAX_SLEEP, 1 s), then went.
    assert [r.status for r in first] == ["delivered"] * 3
    times = [r.send_at for r in reservations]
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [0.5, 0.5]
    assert reservations[0].wait == 0
    assert slept == pytest.approx([reservations[1].wait, reservations[2].wait], abs=0.01)
    assert slept == pytest.approx([0.5, 1.0], abs=0.2)
    assert len(receiver.received()) == 3

    fourth = envelope("rl-3").model_copy(update={"attempt": 0})
    parked = pipeline.run(fourth)
    assert parked.status == "deferred", parked
    assert parked.attempt is None  # the partner never saw it: no attempt spent
    assert len(reservations) == 4
    reserved_at = reservations[3].send_at
    queue = queue_for("templated")
    [(wire, due)] = redis_client.zrange(KEYS.delayed(queue), 0, -1, withscores=True)
    back = DeliveryEnvelope.from_task_arg(decode_task_args(wire.decode())[1][0])
    assert back.reserved_at == reserved_at
    assert back.attempt == 0
    # Due before its time (by the sleep bound, 1 s), to sleep the rest when it is back.
    assert due == pytest.approx(reserved_at - 1.0, abs=0.1)

    # Back from the delay set, shortly before its time: it sleeps the rest and sends without
    # reserving again (deferred once).
    real_now = pipeline.limiter.now
    pipeline.limiter.now = lambda: reserved_at - 0.3  # type: ignore[method-assign]
    slept.clear()
    result = pipeline.run(back)
    assert result.status == "delivered", result
    assert len(reservations) == 4
    assert slept == [pytest.approx(0.3)]
    assert len(receiver.received()) == 4

    # A reservation long past (the delivery sat out an outage) is void: it reserves again.
    pipeline.limiter.now = real_now  # type: ignore[method-assign]
    stale = envelope("rl-4").model_copy(update={"attempt": 0, "reserved_at": real_now() - 30})
    assert pipeline.run(stale).status == "deferred"
    assert len(reservations) == 5
    assert reservations[4].send_at == pytest.approx(reserved_at + 0.5, abs=1e-6)


def test_a_delivery_woken_past_its_slot_reserves_again_and_after_three_misses_goes_back_unsent(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    tmp_path: Path,
    make_runtime: Callable[[Path], WorkerRuntime],
) -> None:
    """A send later than LATE_GRACE past its reserved time would crowd the slots other workers
    hold for now, and the partner's busiest second would pass the limit: it reserves again, and
    a worker too loaded to make any of three slots returns the delivery to its queue rather than
    send it at a time no slot covers."""
    pipeline = limited_net_pipeline(make_runtime, tmp_path, receiver, 'rate_limit = "20/second"')
    item = pipeline.destinations.get("net").rate_limit_item
    reserve = pipeline.limiter.reserve
    reservations = count_reservations(pipeline)
    fresh = iter(f"late-{i}" for i in range(10))

    def run_after_a_slot_taken(oversleep: float, again: DeliveryEnvelope | None = None) -> Any:
        reserve("net", item)  # another worker's: this delivery's slot is 50 ms off

        def sleep(seconds: float) -> None:
            reserve("net", item)  # other workers keep taking the slots that follow
            time.sleep(seconds + oversleep)

        pipeline.turns.sleep = sleep
        if again is None:
            again = envelope(next(fresh)).model_copy(update={"attempt": 0})
        return pipeline.run(again)

    # Woken within the grace: it goes on the slot it has.
    assert run_after_a_slot_taken(pacing.LATE_GRACE / 4).status == "delivered"
    assert len(reservations) == 1
    assert len(receiver.received()) == 1

    # Woken 60 ms late every time: three slots missed, then back to its queue, unsent and not
    # an attempt, holding no reservation (the next worker reserves anew).
    reservations.clear()
    result = run_after_a_slot_taken(0.06)
    assert result.status == "deferred", result
    assert f"missed its send time {pacing.MAX_LAPSES} times" in result.detail
    assert result.attempt is None
    assert len(reservations) == pacing.MAX_LAPSES
    assert len(receiver.received()) == 1
    [wire] = redis_client.lrange(QUEUE, 0, -1)  # due now: on its queue at once
    back = DeliveryEnvelope.from_task_arg(decode_task_args(wire.decode())[1][0])
    assert back.reserved_at is None
    assert back.attempt == 0
    redis_client.delete(QUEUE)
    # Sent back once by this process, it is not sent back by it again: a worker that can never
    # wake on time (the only one) sends it late rather than spend slots on it forever.
    reservations.clear()
    assert run_after_a_slot_taken(0.06, again=back).status == "delivered"
    assert len(reservations) == pacing.MAX_LAPSES
    assert len(receiver.received()) == 2

    # The pause is read before the lateness is judged: a read that takes 60 ms (a Redis round
    # trip on a loaded host) makes the send late, so it does not go on that slot.
    pipeline.turns.sleep = time.sleep
    current = pipeline.pauses.current

    def slow_read(name: str) -> float | None:
        time.sleep(0.06)
        return current(name)

    pipeline.pauses.current = slow_read  # type: ignore[method-assign]
    reservations.clear()
    reserve("net", item)
    result = pipeline.run(envelope("late-slow-read").model_copy(update={"attempt": 0}))
    assert result.status == "deferred", result
    assert len(reservations) == pacing.MAX_LAPSES
    assert len(receiver.received()) == 2


def test_a_reservation_is_spent_even_when_the_attempt_fails_and_the_retry_reserves_anew(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    tmp_path: Path,
    make_runtime: Callable[[Path], WorkerRuntime],
) -> None:
    receiver.responder = lambda req, seen: Answer(503)
    pipeline = limited_net_pipeline(
        make_runtime,
        tmp_path,
        receiver,
        'rate_limit = "1/second"\nretry = { max_attempts = 3, schedule = [60], jitter = 0 }',
    )
    pipeline.turns.sleep = lambda seconds: None
    item = pipeline.destinations.get("net").rate_limit_item
    reserved = envelope("rl-f").model_copy(
        update={"attempt": 0, "max_attempts": 3, "reserved_at": pipeline.limiter.now()}
    )
    before = pipeline.limiter.reserve("net", item)
    result = pipeline.run(reserved)
    assert result.status == "retry_scheduled", result
    assert len(receiver.received()) == 1
    # The failed attempt used the reservation it carried; the retry carries none.
    [(wire, _)] = redis_client.zrange(KEYS.delayed(queue_for("templated")), 0, -1, withscores=True)
    retry = DeliveryEnvelope.from_task_arg(decode_task_args(wire.decode())[1][0])
    assert retry.attempt == 1
    assert retry.reserved_at is None
    assert "reserved_at" not in retry.to_task_arg()  # old workers read it (extra="forbid")
    assert '"reserved_at"' not in wire.decode()
    after = pipeline.limiter.reserve("net", item)
    assert before is not None
    assert after is not None
    assert after.send_at == pytest.approx(before.send_at + 1.0, abs=1e-6)


def test_exhausted_reasons_count_retries_as_the_destinations_file_does() -> None:
    # retry.max_attempts = 2 means two retries after the first send: three attempts in all.
    three = envelope("e1", attempts=3)
    assert three.retries_counted() == "first send + 2 of 2 retries"
    assert envelope("e2", attempts=1).retries_counted() == "first send; no retries allowed"
    dead = entry("e3", reason=f"attempts exhausted ({three.retries_counted()}): HTTP 503")
    assert dead.reason_category == "attempts exhausted"


def test_this_process_sees_its_own_pause_at_once_and_another_workers_within_max_age(
    pause_backend: redis.Redis,
) -> None:
    ours = PauseRegistry(pause_backend, KEYS, max_age=0.2)
    theirs = PauseRegistry(pause_backend, KEYS, max_age=0.2)
    assert ours.current("net") is None  # read now: not paused, kept for up to 0.2 s
    until = theirs.pause("net", 30, "429 Retry-After: 30") and theirs.paused_until("net")
    assert until is not None
    assert ours.current("net") is None  # its view is younger than max_age: no read yet
    time.sleep(0.25)
    assert ours.current("net") == until  # read again: another worker's pause
    # Its own pause holds its own deliveries back at once, with no read: even were the key
    # gone, it still answers from the pause it wrote itself.
    ours.pause("other", 30, "HTTP 401")
    pause_backend.delete(KEYS.paused("other"))
    assert ours.current("other") is not None
    time.sleep(0.25)
    assert ours.current("other") is None  # read again: gone
    assert ours.resume("net") is True
    assert ours.current("net") is None  # an operator's resume here is seen at once too


def test_a_delivery_that_waited_is_deferred_when_its_destination_was_paused_meanwhile(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    tmp_path: Path,
    make_runtime: Callable[[Path], WorkerRuntime],
) -> None:
    """A batch's members start together; one still waiting its turn when another worker's
    429 pauses the destination looks again before it sends, and goes back until the pause
    ends instead of reaching a partner that asked for quiet."""
    pipeline = make_runtime(net_destination(tmp_path, receiver)).pipeline
    (started,) = pipeline.start([envelope("e-waited")])
    assert started.paused_until is None
    PauseRegistry(redis_client, KEYS).pause("net", 30, "429 Retry-After: 30")  # another worker
    time.sleep(pipeline.pauses.max_age + 0.05)
    result = pipeline.attempt(started)
    assert result.status == "deferred", result
    assert "paused" in result.detail
    assert receiver.received() == []
    pipeline.finish([(started.envelope, result)])  # its writes, with its completion wave's
    # Parked until the pause ends, in the delay set, with its ledger entry kept.
    due = redis_client.zrange(KEYS.delayed("postback.templated"), 0, -1, withscores=True)
    assert len(due) == 1
    assert due[0][1] > time.time() + 25
