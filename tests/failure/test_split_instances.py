"""Separate broker and state instances under load: each is SIGKILLed and restarted in turn while
a producer produces and a worker delivers to a real HTTP receiver; every event whose produce()
returned is delivered or dead-lettered. Then the broker's data is lost outright (a new, empty
instance): the state's delivery ledger alone brings every accepted event back.

Two redis-server processes of our own, each with AOF ``appendfsync always`` (the system of
record's configuration): a restart keeps every write Redis acknowledged. What each instance
holds: config/keys.py. The ledger's lease and kombu's visibility timeout are shortened so
that both recovery paths (kombu's restore of unacked messages, the ledger's sweep of what
kombu lost or the broker never received) act within the test.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from config.keys import RedisKeys
from config.settings import Settings
from producers.produce import Producer
from tests.conftest import WorkerProcess
from tests.failure.test_crashes import (
    CRASH_ENV,
    VISIBILITY,
    ContinuousProducer,
    destinations,
    ok_keys,
    tail,
)
from tests.helpers import wait_until
from workers.dev.embedded_redis import EmbeddedRedis
from workers.dev.receiver import Answer, PostbackReceiver, ReceivedRequest
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

LEASE = 2 * VISIBILITY  # the ledger's lease: 20 s (workers and producer agree)
OUTAGE = 2.0  # seconds each instance stays down
GAVE_BACK = '"delivery.redis_unavailable"'  # a worker's log line: a message back on its queue


def settled(receiver: PostbackReceiver, dead: DeadLetterStore, ids: set[str]) -> set[str]:
    """Which of ``ids`` were delivered (a 2xx) or dead-lettered."""
    done = ids & set(ok_keys(receiver))
    with contextlib.suppress(redis.RedisError):  # the state is down: what the receiver saw
        done |= ids & {entry.delivery_id for entry in dead.iter_entries()}
    return done


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch in [start, end] without a 2xx reaching the receiver."""
    marks = [start, *sorted(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(marks))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "crashes",
    [(("broker", False), ("state", False)), (("broker", True),)],
    ids=["broker-then-state", "broker-data-lost"],
)
def test_broker_and_state_each_sigkilled_under_load_lose_no_accepted_event(
    crashes: tuple[tuple[str, bool], ...],
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    rng = random.Random(15)

    def partner(req: ReceivedRequest, seen: int) -> Answer:
        # One event in ten fails its first attempt: retries (the requeue, the delay set and its
        # mover) run across the crashes too.
        if seen == 0 and req.path.endswith("0"):
            return Answer(503)
        return Answer(200, delay=rng.uniform(0.005, 0.02))

    receiver.responder = partner
    path = write_destinations(destinations(receiver.url))
    servers = {
        "broker": EmbeddedRedis(tmp_path / "broker").start(),
        "state": EmbeddedRedis(tmp_path / "state").start(),
    }
    env = {
        **CRASH_ENV,
        "POSTBACK_RELAY_REDIS_URL": servers["broker"].url,
        "POSTBACK_RELAY_STATE_REDIS_URL": servers["state"].url,
        "POSTBACK_RELAY_LEDGER_LEASE": str(LEASE),
    }
    settings = Settings(
        redis_url=servers["broker"].url,
        state_redis_url=servers["state"].url,
        destinations_file=path,
        ledger_lease=LEASE,
    )
    producer = Producer.from_settings(settings)
    assert producer.redis is not producer._enqueue.broker, "two instances, two clients"
    dead = DeadLetterStore(redis.Redis.from_url(servers["state"].url), RedisKeys("pr"))
    load = ContinuousProducer(producer)
    worker: WorkerProcess | None = None
    figures: list[str] = []
    try:
        worker = start_worker(
            path, "--queues", "templated", "--pool", "gevent", "--concurrency", "4", env=env
        )
        load.thread.start()
        assert wait_until(lambda: len(receiver.received(ok_only=True)) >= 100, 60), tail(worker)

        for name, data_lost in crashes:
            errors_before = sum(load.errors.values())
            rejects_before = worker.log().count(GAVE_BACK)
            killed_at = time.time()
            servers[name].kill()
            if data_lost:  # a new, empty instance: only the state's ledger knows the queues
                shutil.rmtree(servers[name].data_dir)
            time.sleep(OUTAGE)
            servers[name].start()  # the same port and data directory: its AOF is replayed
            restarted_at = time.time()
            assert load.wait_accepted_after(restarted_at, count=40, timeout=30), (
                f"the producer did not recover after the {name} restart: {dict(load.errors)}"
            )
            due = {d for d, t in list(load.accepted.items()) if t <= restarted_at}
            due |= load.late_duplicates
            assert wait_until(lambda due=due: settled(receiver, dead, due) == due, 90), (
                f"after the {name} restart, {len(due - settled(receiver, dead, due))} accepted "
                f"events were neither delivered nor dead-lettered in 90 s\n" + tail(worker)
            )
            recovered_at = time.time()
            assert worker.proc.poll() is None, f"the worker died with the {name}\n" + tail(worker)
            arrivals = [r.at for r in receiver.received(ok_only=True)]
            errors = sum(load.errors.values()) - errors_before
            during = [t for t in list(load.accepted.values()) if killed_at < t < restarted_at]
            figures.append(
                f"{name}{' (data lost)' if data_lost else ''}: killed for {OUTAGE:.0f} s; every event accepted by then settled "
                f"{recovered_at - killed_at:.1f} s after the kill; longest time without a "
                f"delivery {longest_gap(arrivals, killed_at, recovered_at):.1f} s; produce() "
                f"errors {errors}; deliveries accepted while it was down {len(during)}; "
                f"messages the worker gave back for want of Redis "
                f"{worker.log().count(GAVE_BACK) - rejects_before}"
            )
            if name == "broker":
                # The state took them: accepted, and delivered through the ledger's sweep.
                assert errors == 0, dict(load.errors)
                assert len(during) >= 10, figures[-1]
            else:
                assert errors > 0, "the state was down: produce() must have failed"
        load.stop()

        everything = set(load.accepted) | load.late_duplicates
        assert wait_until(lambda: settled(receiver, dead, everything) == everything, 60), (
            f"{len(everything - settled(receiver, dead, everything))} accepted events lost\n"
            + tail(worker)
        )
        time.sleep(1.0)  # stragglers (duplicates of in-flight work) before counting
        got = ok_keys(receiver)
        duplicates = {key: n - 1 for key, n in got.items() if n > 1}
        dead_ids = {entry.delivery_id for entry in dead.iter_entries()}
        retried = {r.path for r in receiver.received() if r.status == 503}
        print(
            "\n" + "\n".join(figures) + f"\naccepted: {len(load.accepted)}; produce() errors: "
            f"{dict(load.errors)}; retried ids already enqueued: {len(load.late_duplicates)}; "
            f"first attempts answered 503: {len(retried)}; "
            f"delivered: {len(set(got) & everything)}; dead-lettered: {len(dead_ids)}; lost: "
            f"{len(everything - set(got) - dead_ids)}; duplicated ids: {len(duplicates)} "
            f"({sum(duplicates.values())} extra requests)"
        )
        assert everything - set(got) - dead_ids == set()  # 0 accepted events lost
        assert set(got) <= everything  # nothing the producer did not accept
        assert len(retried) >= 10, "retries must have run"
        assert worker.proc.poll() is None, tail(worker)
    finally:
        load.stopped.set()
        if worker is not None:
            worker.stop()
        for server in servers.values():
            server.stop()
