"""Batch messages (POSTBACK_RELAY_BATCH_SIZE): how producers and the delay mover group
deliveries, what Flower sees of a batch, and how a worker runs one: each delivery on its own,
settled ones skipped when the message comes back, old single-envelope messages still run."""

# ruff: noqa: RUF001 - Flower's batch argsrepr counts with a multiplication sign

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from config.destinations import load_destinations
from config.keys import RedisKeys, queue_for, task_name_for
from config.settings import Settings
from producers.produce import Producer
from schemas.envelope import DeliveryEnvelope, delivery_id_for
from schemas.event import ConversionEvent
from tests.helpers import IDFA, install_event, net_destination_toml
from workers.app import create_app
from workers.broker.keys import queue_list
from workers.broker.wire import TaskMessageEncoder, batch_argsrepr, decode_task_args
from workers.delivery.batch import completion_waves
from workers.dev.receiver import Answer, PostbackReceiver
from workers.runtime import WorkerRuntime
from workers.stores.delay import DelaySet

KEYS = RedisKeys("pr")
QUEUE = queue_for("templated")

TWO_DESTINATIONS = """
[[destination]]
name = "network-installs"
kind = "templated"
url = "{url}/a?idfa=(idfa)"
[[destination.routes]]
type = "install"

[[destination]]
name = "analytics"
kind = "templated"
url = "{url}/b?idfa=(idfa)"
[[destination.routes]]
type = "install"
"""


def event(event_id: str, idfa: str = IDFA) -> dict[str, Any]:
    return dict(install_event(event_id, idfa))


def envelope(event_id: str, destination: str = "net", idfa: str = IDFA) -> DeliveryEnvelope:
    return DeliveryEnvelope(
        delivery_id=delivery_id_for(event_id, destination),
        destination=destination,
        kind="templated",
        event=ConversionEvent.parse(event(event_id, idfa)),
        max_attempts=3,
        created_at=datetime.now(UTC),
    )


def queued(client: redis.Redis) -> list[tuple[dict[str, Any], list[Any]]]:
    """Headers and args of every message on the templated queue, oldest first."""
    items: list[bytes] = client.lrange(queue_list(QUEUE), 0, -1)  # type: ignore[assignment]
    return [decode_task_args(item.decode()) for item in reversed(items)]


def tracked(runtime: WorkerRuntime, *envelopes: DeliveryEnvelope) -> list[dict[str, Any]]:
    """A batch message's argument, its deliveries in the ledger as produce_many leaves them (a
    batch skips a delivery the ledger does not hold: an earlier run settled it)."""
    with runtime.redis.pipeline() as pipe:
        for e in envelopes:
            wire = runtime.encoder.encode_envelope(e, e.delivery_id)
            runtime.ledger.park(pipe, e.delivery_id, QUEUE, wire, time.time())
        pipe.execute()
    return [e.to_task_arg() for e in envelopes]


@pytest.fixture
def producer_of(redis_url: str, redis_client: redis.Redis) -> Callable[[Path, int], Producer]:
    def make(path: Path, batch_size: int) -> Producer:
        settings = Settings(redis_url=redis_url, destinations_file=path, batch_size=batch_size)
        return Producer(settings, load_destinations(path), redis_client)

    return make


@pytest.fixture
def runtime_of(redis_url: str) -> Callable[[Path, int], WorkerRuntime]:
    def make(path: Path, batch_size: int = 10) -> WorkerRuntime:
        settings = Settings(redis_url=redis_url, destinations_file=path, batch_size=batch_size)
        return create_app(settings).runtime

    return make


def test_batch_argsrepr_counts_destinations_and_shows_no_event_field() -> None:
    shown = batch_argsrepr(["network-installs"] * 7 + ["analytics"] * 5)
    assert shown == "(12 deliveries: network-installs×7, analytics×5)"
    assert batch_argsrepr(["a"]) == "(1 delivery: a×1)"


def test_produce_many_groups_each_kind_into_batches_of_the_setting(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    producer_of: Callable[[Path, int], Producer],
) -> None:
    path = write_destinations(TWO_DESTINATIONS.format(url=receiver.url))
    results = producer_of(path, 10).produce_many([event(f"e{i}") for i in range(12)])

    ids = [d for r in results for d in r.accepted]
    assert len(ids) == 24
    messages = queued(redis_client)
    assert [len(args[0]) for _, args in messages] == [10, 10, 4]
    carried = [env["delivery_id"] for _, args in messages for env in args[0]]
    assert sorted(carried) == sorted(ids)  # each delivery once, in one message
    for headers, args in messages:
        assert headers["task"] == task_name_for("templated")
        assert IDFA not in headers["argsrepr"]
        assert "http" not in headers["argsrepr"]
        assert headers["argsrepr"].startswith(f"({len(args[0])} deliveries: ")
    # Each delivery keeps its own ledger entry: its single-envelope message, for the sweep.
    for delivery_id in ids:
        value = redis_client.hget(KEYS.ledger_messages(), delivery_id)
        assert value is not None
        queue, wire = value.decode().split("\n", 1)
        assert queue == QUEUE
        assert decode_task_args(wire)[1][0]["delivery_id"] == delivery_id


def test_batch_size_1_publishes_one_envelope_per_message_as_before(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    producer_of: Callable[[Path, int], Producer],
) -> None:
    path = write_destinations(TWO_DESTINATIONS.format(url=receiver.url))
    producer_of(path, 1).produce_many([event(f"e{i}") for i in range(3)])

    messages = queued(redis_client)
    assert len(messages) == 6
    for headers, args in messages:
        assert isinstance(args[0], dict)
        assert headers["id"] == args[0]["delivery_id"]
        assert headers["argsrepr"] == DeliveryEnvelope.from_task_arg(args[0]).task_argsrepr()


def test_a_batch_with_a_duplicate_sends_only_its_new_deliveries_each_alone(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    producer_of: Callable[[Path, int], Producer],
) -> None:
    path = write_destinations(net_destination_toml(receiver.url))
    producer = producer_of(path, 10)
    producer.produce(event("e1"))
    redis_client.delete(queue_list(QUEUE))

    results = producer.produce_many([event(f"e{i}") for i in range(4)])

    assert [len(r.duplicates) for r in results] == [0, 1, 0, 0]
    messages = queued(redis_client)
    # The batch of 4 could not go out whole: its 3 new deliveries went out in their own.
    assert all(isinstance(args[0], dict) for _, args in messages)
    assert sorted(args[0]["delivery_id"] for _, args in messages) == sorted(
        delivery_id_for(f"e{i}", "net") for i in (0, 2, 3)
    )


def test_the_delay_mover_groups_due_deliveries_of_a_queue(redis_client: redis.Redis) -> None:
    encoder = TaskMessageEncoder(Celery(set_as_current=False))
    delays = DelaySet(redis_client, KEYS, batch_size=3, encoder=encoder)
    envelopes = [envelope(f"e{i}") for i in range(5)]
    for e in envelopes:
        delays.schedule(QUEUE, encoder.encode_envelope(e, e.delivery_id), due=time.time() - 1)
    delays.schedule(QUEUE, encoder.encode_envelope(envelope("later"), "l"), time.time() + 60)
    other = encoder.encode("postback_relay.reconcile", QUEUE, ("src",), "('src',)")
    delays.schedule(QUEUE, other, due=time.time() - 1)

    assert delays.move_due([QUEUE]) == 6

    messages = queued(redis_client)
    sizes = sorted(len(args[0]) if isinstance(args[0], list) else 0 for _, args in messages)
    assert sizes == [0, 2, 3]  # the other task alone, the five deliveries in two batches
    carried = [
        env["delivery_id"] for _, args in messages if isinstance(args[0], list) for env in args[0]
    ]
    assert sorted(carried) == sorted(e.delivery_id for e in envelopes)
    assert delays.depth(QUEUE) == 1


def test_a_member_another_mover_took_is_not_published_twice(redis_client: redis.Redis) -> None:
    encoder = TaskMessageEncoder(Celery(set_as_current=False))
    delays = DelaySet(redis_client, KEYS, batch_size=10, encoder=encoder)
    wires = [encoder.encode_envelope(envelope(f"e{i}"), f"t{i}") for i in range(3)]
    for wire in wires:
        delays.schedule(QUEUE, wire, due=0)
    # Another mover takes e0 between this mover's read and its move.
    read = redis_client.zrangebyscore

    def read_then_lose_one(*args: Any, **kwargs: Any) -> Any:
        due = read(*args, **kwargs)
        redis_client.zrem(KEYS.delayed(QUEUE), wires[0])
        return due

    delays.redis.zrangebyscore = read_then_lose_one  # type: ignore[method-assign]

    assert delays.move_due([QUEUE]) == 2

    messages = queued(redis_client)
    assert [args[0]["delivery_id"] for _, args in messages] == [
        envelope(f"e{i}").delivery_id for i in (1, 2)
    ]


def test_a_worker_runs_a_batch_each_delivery_with_its_own_key_and_outcome(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    net_destination: Path,
    runtime_of: Callable[..., WorkerRuntime],
) -> None:
    refused = "00000000-0000-0000-0000-000000000400"
    receiver.responder = lambda req, _n: Answer(400 if refused in req.raw_target else 200)
    runtime = runtime_of(net_destination)
    good = [envelope(f"e{i}") for i in range(4)]
    bad = envelope("bad", idfa=refused)
    batch = tracked(runtime, *good, bad)

    report = runtime.deliver_batch(batch, "task-1")

    statuses = {d: r.status for d, r in report.results.items()}
    assert [statuses[e.delivery_id] for e in good] == ["delivered"] * 4
    assert statuses[bad.delivery_id] == "dead_lettered"
    keys = sorted(r.headers.get("X-Idempotency-Key", "") for r in receiver.requests)
    assert keys == sorted(e.delivery_id for e in [*good, bad])
    assert 1 <= report.waves <= 5
    assert runtime.dead_letters.get(bad.delivery_id) is not None
    assert runtime.attempts.count() == 5  # one attempt record each


@pytest.fixture
def produced_batch(
    redis_client: redis.Redis,
    net_destination: Path,
    producer_of: Callable[[Path, int], Producer],
) -> Callable[[int], list[dict[str, Any]]]:
    """``count`` events through produce_many with batches of 10: the one message's members."""

    def produce(count: int) -> list[dict[str, Any]]:
        producer_of(net_destination, 10).produce_many([event(f"e{i}") for i in range(count)])
        ((_, args),) = queued(redis_client)
        members: list[dict[str, Any]] = args[0]
        return members

    return produce


def test_a_redelivered_batch_skips_what_the_ledger_shows_settled(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    net_destination: Path,
    produced_batch: Callable[[int], list[dict[str, Any]]],
    runtime_of: Callable[..., WorkerRuntime],
) -> None:
    members = produced_batch(5)
    runtime = runtime_of(net_destination)
    # A first run delivered three of them, then its worker died before the ack.
    first = members[:3]
    runtime.deliver_batch(first, "task-1")
    assert len(receiver.requests) == 3

    report = runtime.deliver_batch(members, "task-1")

    assert sorted(report.already_settled) == sorted(env["delivery_id"] for env in first)
    assert len(receiver.requests) == 5  # only the two left were sent
    assert {r.status for r in report.results.values()} == {"delivered"}
    assert redis_client.zcard(KEYS.ledger()) == 0
    assert not redis_client.keys("*unfinished*")
    # Once more, all settled: nothing is sent.
    again = runtime.deliver_batch(members, "task-1")
    assert sorted(again.already_settled) == sorted(env["delivery_id"] for env in members)
    assert (again.results, again.waves) == ({}, 1)
    assert len(receiver.requests) == 5
    assert not redis_client.keys("*unfinished*")


def test_a_batch_whose_earlier_run_crashed_sends_each_delivery_on_alone(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    net_destination: Path,
    produced_batch: Callable[[int], list[dict[str, Any]]],
    runtime_of: Callable[..., WorkerRuntime],
) -> None:
    members = produced_batch(3)
    redis_client.delete(queue_list(QUEUE))
    for env in members:  # an earlier start of each never finished: its worker died
        redis_client.set(KEYS.unfinished_starts(env["delivery_id"], 0), 1)
    runtime = runtime_of(net_destination)

    report = runtime.deliver_batch(members, "task-1")

    assert len(receiver.requests) == 0
    assert sorted(report.split) == sorted(env["delivery_id"] for env in members)
    messages = queued(redis_client)
    assert sorted(a[0]["delivery_id"] for _, a in messages) == sorted(report.split)
    for env in members:  # the crash stays counted; this start, which finished, does not
        assert redis_client.get(KEYS.unfinished_starts(env["delivery_id"], 0)) == b"1"


def test_the_task_runs_an_old_single_envelope_message_and_a_batch(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    net_destination: Path,
    redis_url: str,
) -> None:
    settings = Settings(redis_url=redis_url, destinations_file=net_destination, batch_size=10)
    app = create_app(settings)
    task = app.tasks[task_name_for("templated")]

    single = task.apply(args=(envelope("old").to_task_arg(),)).get()
    members = tracked(app.runtime, envelope("b1"), envelope("b2"))
    batch = task.apply(args=(members,)).get()

    assert single.startswith("delivered")
    assert batch == "delivered: 2"
    assert len(receiver.requests) == 3


def test_a_batch_goes_out_at_once_not_one_after_another(
    receiver: PostbackReceiver,
    net_destination: Path,
    runtime_of: Callable[..., WorkerRuntime],
) -> None:
    def slow(_req: Any, _n: int) -> Answer:
        time.sleep(0.4)
        return Answer(200)

    receiver.responder = slow
    runtime = runtime_of(net_destination)
    started = time.monotonic()
    members = tracked(runtime, *(envelope(f"e{i}") for i in range(8)))
    report = runtime.deliver_batch(members, "t")
    elapsed = time.monotonic() - started

    assert {r.status for r in report.results.values()} == {"delivered"}
    assert elapsed < 8 * 0.4 / 2, elapsed  # sequential would take 3.2 s


def test_a_poison_member_is_dead_lettered_alone(
    receiver: PostbackReceiver,
    net_destination: Path,
    runtime_of: Callable[..., WorkerRuntime],
) -> None:
    runtime = runtime_of(net_destination)
    report = runtime.deliver_batch([*tracked(runtime, envelope("ok")), {"not": "one"}, "x"], "t-9")

    statuses = sorted(r.status for r in report.results.values())
    assert statuses == ["dead_lettered", "dead_lettered", "delivered"]
    assert runtime.dead_letters.get("poison-t-9.1") is not None
    # The report names each poison member by its dead letter's id (its place in the message).
    poison_ids = {key for key in report.results if key.startswith("poison-")}
    assert poison_ids == {"poison-t-9.1", "poison-t-9.2"}
    assert all(runtime.dead_letters.get(key) is not None for key in poison_ids)
    assert report.summary() == "dead_lettered: 2, delivered: 1"


def test_with_batches_redis_pools_grow_with_the_deliveries_in_flight_up_to_a_cap() -> None:
    assert Settings(batch_size=1).redis_pool_size == 64 + 8  # one per task, as before
    batched = Settings(batch_size=50, worker_concurrency=3)
    assert batched.concurrency == 3
    assert batched.deliveries_in_flight == 150
    assert batched.redis_pool_size == 158
    assert Settings(batch_size=50).redis_pool_size == 256 + 8
    assert Settings(batch_size=50, worker_concurrency=300).redis_pool_size == 300 + 8


def test_a_batch_reserves_its_send_times_together_and_parks_its_late_ones_in_one_transaction(
    redis_client: redis.Redis,
    receiver: PostbackReceiver,
    tmp_path: Path,
    runtime_of: Callable[..., WorkerRuntime],
) -> None:
    """Six deliveries to a destination limited to 4/second: one reservation call for all six
    (slots 0.25 s apart), the five within the 1-s sleep bound sent in their turn, the sixth
    (1.25 s off) parked with its slot, in the same transaction as any other of its wave."""
    path = tmp_path / "destinations.toml"
    path.write_text(
        net_destination_toml(receiver.url).replace(
            "[[destination.routes]]", 'rate_limit = "4/second"\n[[destination.routes]]'
        )
    )
    runtime = runtime_of(path)
    limiter = runtime.pipeline.limiter
    calls: list[tuple[str, int]] = []
    reserve_many = limiter.reserve_many

    def counted(key: str, item: Any, count: int, *args: Any, **kwargs: Any) -> Any:
        calls.append((key, count))
        return reserve_many(key, item, count, *args, **kwargs)

    limiter.reserve_many = counted  # type: ignore[method-assign]
    multis: list[int] = []
    later_many = runtime.requeuer.later_many

    def parked(items: list[tuple[DeliveryEnvelope, float]], now: float | None = None) -> None:
        if items:
            multis.append(len(items))
        later_many(items, now)

    runtime.requeuer.later_many = parked  # type: ignore[method-assign]
    members = [envelope(f"r{i}") for i in range(6)]

    report = runtime.deliver_batch(tracked(runtime, *members), "task-r")

    assert calls == [("net", 6)]  # one round trip for the batch, none per delivery
    statuses = [report.results[m.delivery_id].status for m in members]
    assert statuses.count("delivered") == 5
    assert statuses.count("deferred") == 1
    arrivals = sorted(r.at for r in receiver.received())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) > 0.2  # evenly spaced, 0.25 s apart (minus arrival jitter)
    assert multis == [1]  # the parked one, with its wave's finish
    [(wire, due)] = redis_client.zrange(KEYS.delayed(QUEUE), 0, -1, withscores=True)
    back = DeliveryEnvelope.from_task_arg(decode_task_args(wire.decode())[1][0])
    assert back.reserved_at is not None
    assert back.reserved_at == pytest.approx(arrivals[0] + 1.25, abs=0.1)
    assert due < back.reserved_at  # back shortly before its slot, to sleep the rest
    assert redis_client.zscore(KEYS.ledger(), back.delivery_id) is not None


def test_a_completion_wave_waits_up_to_the_linger_for_more_of_its_batch() -> None:
    """Deliveries finishing 50 ms apart share a wave (one round trip of finish writes); one
    that finishes after the linger has passed starts the next wave."""

    def after(seconds: float, value: str) -> Callable[[], str]:
        def call() -> str:
            time.sleep(seconds)
            return value

        return call

    calls = [after(0.0, "a"), after(0.05, "b"), after(0.6, "c")]
    waves = [sorted(value for _, value, _ in wave) for wave in completion_waves(calls, 0.2)]
    assert waves == [["a", "b"], ["c"]]
    # Without a linger each finish is its own wave.
    calls = [after(0.0, "a"), after(0.3, "b"), after(0.6, "c")]
    waves = [sorted(value for _, value, _ in wave) for wave in completion_waves(calls, 0)]
    assert waves == [["a"], ["b"], ["c"]]


def test_a_time_limit_during_the_linger_still_hands_over_what_had_finished() -> None:
    """A soft time limit raised while a wave lingers: the deliveries that had finished are
    yielded (recorded as what they were) before the limit goes on to the collector."""
    import gevent

    from workers.delivery.batch import _greenlet_waves

    def slow() -> str:
        gevent.sleep(5)
        return "late"

    got: list[list[Any]] = []

    def collect() -> None:
        with gevent.Timeout(0.1):  # what Celery's gevent pool raises at a time limit
            for wave in _greenlet_waves([lambda: "sent", slow], 1.0):
                got.append([value for _, value, _ in wave])

    with pytest.raises(gevent.Timeout):
        collect()
    assert got == [["sent"]]
