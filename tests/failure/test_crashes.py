"""Crashes: SIGKILLed workers, a SIGKILLed Redis, poison messages, a message that kills its worker,
and the duplicates that failed acks and the ledger's sweep could cause.

Every test runs real worker processes against a real Redis and a real local HTTP server and
asserts counts: which delivery ids reached the partner with a 2xx, how many duplicates, what is
in the dead-letter store.

A note on kombu's visibility-timeout restore, which several tests rely on: kombu 5.7's Redis
transport scans for unacked messages older than ``visibility_timeout`` when a consumer starts
polling, and afterwards every ``unacked_restore_interval * unacked_restore_throttle`` seconds
(the app sets 10 * 1) or, with gevent, on idle polls. So the messages a dead worker held come
back once they are older than the visibility timeout and a worker is polling; the tests start
the replacement worker after that point, then wait for the restore with a generous bound.
"""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celery
import pytest
import redis

from config.destinations import load_destinations
from config.keys import RedisKeys
from config.settings import Settings
from producers.produce import Producer
from schemas.deadletter import DeadLetter
from schemas.envelope import delivery_id_for
from tests.conftest import WorkerProcess
from tests.helpers import cli_env, run_cli, wait_until
from workers.broker.wire import TaskMessageEncoder, decode_task_args
from workers.dev.embedded_redis import EmbeddedRedis
from workers.dev.receiver import Answer, PostbackReceiver, ReceivedRequest
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
QUEUE = "postback.templated"
DESTINATION = "crash-net"
VISIBILITY = 10

# Timeouts nest: connect + read (3) < soft (6) < hard (8) < visibility (10).
CRASH_ENV = {
    "POSTBACK_RELAY_VISIBILITY_TIMEOUT": str(VISIBILITY),
    "POSTBACK_RELAY_TASK_SOFT_TIME_LIMIT": "6",
    "POSTBACK_RELAY_TASK_TIME_LIMIT": "8",
    "POSTBACK_RELAY_HTTP_CONNECT_TIMEOUT": "1",
    "POSTBACK_RELAY_HTTP_READ_TIMEOUT": "2",
}


def destinations(base: str, read: float = 2) -> str:
    return f"""
[[destination]]
name = "{DESTINATION}"
kind = "templated"
url = "{base}/pb/(event_id)"
timeout = {{ connect = 1, read = {read} }}
retry = {{ max_attempts = 3, schedule = [0.5, 1, 1], jitter = 0, max_age_seconds = 600 }}
[[destination.routes]]
type = "install"
"""


def install(event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "app_id": "123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T10:00:00+01:00",
        "idfa": IDFA,
    }


def leased_producer(
    redis_url: str,
    path: Path,
    client: redis.Redis,
    lease: int = 2 * VISIBILITY,
    batch_size: int = 1,
) -> Producer:
    """A producer whose ledger lease matches the workers' (2 x visibility by default)."""
    settings = Settings(
        redis_url=redis_url, destinations_file=path, ledger_lease=lease, batch_size=batch_size
    )
    return Producer(settings, load_destinations(path), client)


def ok_keys(receiver: PostbackReceiver) -> Counter[str]:
    """X-Idempotency-Key of every request the receiver answered with a 2xx, with multiplicity."""
    return Counter(r.headers["X-Idempotency-Key"] for r in receiver.received(ok_only=True))


def all_delivered(receiver: PostbackReceiver, ids: set[str], timeout: float) -> bool:
    """Wait until every id in ``ids`` has reached the receiver with a 2xx."""
    return wait_until(lambda: set(ok_keys(receiver)) >= ids, timeout)


def sleep_until(wall_clock: float) -> None:
    time.sleep(max(0.0, wall_clock - time.time()))


def tail(*workers: WorkerProcess, chars: int = 2500) -> str:
    return "\n".join(f"--- {w.log_path.name}:\n{w.log()[-chars:]}" for w in workers)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("pool", "batch_size"),
    [("gevent", 1), ("threads", 1), ("gevent", 10)],
    ids=["gevent", "threads", "gevent-batches-of-10"],
)
def test_sigkilled_worker_loses_nothing_and_duplicates_keep_their_key(
    pool: str,
    batch_size: int,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    rng = random.Random(7)
    receiver.responder = lambda req, seen: Answer(200, delay=rng.uniform(0.005, 0.02))
    path = write_destinations(destinations(receiver.url))
    # The ledger's lease matches the workers' (2 x visibility): a message the killed worker had
    # popped but not yet recorded as unacked (kombu's gap) comes back through the ledger.
    producer = leased_producer(redis_url, path, redis_client, batch_size=batch_size)
    results = producer.produce_many(install(f"kill-{i}") for i in range(2000))
    accepted = {d for r in results for d in r.accepted}
    assert len(accepted) == 2000

    options = ["--queues", "templated", "--pool", pool, "--concurrency", "4"]
    env = {**CRASH_ENV, "POSTBACK_RELAY_BATCH_SIZE": str(batch_size)}
    doomed = start_worker(path, *options, env=env)
    survivor = start_worker(path, *options, "--hostname", "w2@%h", env=env)
    assert wait_until(lambda: len(receiver.received()) >= 400, 60), tail(doomed, survivor)
    doomed.signal(signal.SIGKILL)
    killed_at = time.time()
    doomed.proc.wait(10)
    received_at_kill = len(receiver.received())
    assert received_at_kill < 2000, "the kill must land mid-stream"

    # The survivor drains the queue; what the dead worker held stays unacked until a restore.
    assert wait_until(lambda: redis_client.llen(QUEUE) == 0, 60), tail(survivor)
    # What is still undelivered once the survivor's own deliveries are done (1 s after the queue
    # ran dry), and before any message the killed worker took can have passed the visibility
    # timeout, was held by the killed worker: only a restore (the survivor's, every 10 s, or the
    # replacement's) can deliver it. A faster worker restores and sends it within a second of
    # the timeout, so it must be counted before then.
    sleep_until(min(time.time() + 1.0, killed_at + VISIBILITY - 2))
    stranded = accepted - set(ok_keys(receiver))
    sleep_until(killed_at + VISIBILITY + 1)
    replacement = start_worker(path, *options, env=env)

    assert all_delivered(receiver, accepted, timeout=60), (
        f"{len(accepted - set(ok_keys(receiver)))} never delivered\n" + tail(survivor, replacement)
    )
    time.sleep(1.0)  # let stragglers (duplicates of in-flight work) arrive before counting
    got = ok_keys(receiver)
    duplicates = {key: n for key, n in got.items() if n > 1}
    print(
        f"\nreceived at kill: {received_at_kill}; stranded by the kill: {len(stranded)}; "
        f"2xx requests: {sum(got.values())}; distinct ids: {len(got)}; "
        f"duplicated ids: {len(duplicates)} -> {duplicates}"
    )
    assert set(got) == accepted  # every id delivered, nothing the producer did not accept
    assert set(duplicates) <= accepted  # duplicates only of accepted deliveries
    # Every request, duplicates included, carries the key of the event it delivers.
    mismatched = [
        r.path
        for r in receiver.received()
        if r.headers["X-Idempotency-Key"]
        != delivery_id_for(r.path.removeprefix("/pb/"), DESTINATION)
    ]
    assert mismatched == []
    assert stranded, "the killed worker held messages that only the restore could deliver"
    assert DeadLetterStore(redis_client, RedisKeys("pr")).count() == 0
    assert wait_until(lambda: redis_client.hlen("unacked") == 0, 20), "messages left unacked"
    assert survivor.proc.poll() is None
    assert replacement.proc.poll() is None


@pytest.mark.timeout(90)
def test_a_worker_sigkilled_mid_batch_loses_nothing_and_resends_only_what_was_in_flight(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    """One batch message of 10: the partner answers 4 at once and holds 6; the worker dies with
    the 4 settled and the 6 in flight. The batch comes back (kombu's restore), skips the 4 the
    ledger shows settled and sends the 6 again: duplicates <= the batch's in-flight deliveries."""
    release = threading.Event()

    def partner(req: ReceivedRequest, seen: int) -> Answer:
        if seen == 0 and req.path.startswith("/pb/held-"):
            release.wait(60)  # answered after the kill, to a closed socket
        return Answer(200)

    receiver.responder = partner
    receiver.server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    path = write_destinations(destinations(receiver.url))
    settings = Settings(
        redis_url=redis_url, destinations_file=path, ledger_lease=2 * VISIBILITY, batch_size=10
    )
    producer = Producer(settings, load_destinations(path), redis_client)
    names = [f"quick-{i}" for i in range(4)] + [f"held-{i}" for i in range(6)]
    results = producer.produce_many(install(name) for name in names)
    accepted = {d for r in results for d in r.accepted}
    assert len(accepted) == 10
    assert redis_client.llen(QUEUE) == 1, "the ten deliveries travel in one message"
    quick = {delivery_id_for(name, DESTINATION) for name in names[:4]}
    ledger = RedisKeys("pr").ledger()

    env = {**CRASH_ENV, "POSTBACK_RELAY_BATCH_SIZE": "10"}
    options = ["--queues", "templated", "--pool", "gevent", "--concurrency", "1"]
    workers = [start_worker(path, *options, env=env)]
    try:
        # All ten reach the partner at once (one message, concurrent sends); the quick four
        # are settled, the held six are in flight.
        assert wait_until(lambda: sum(receiver.counts.values()) == 10, 30), tail(*workers)
        assert wait_until(lambda: redis_client.zcard(ledger) == 6, 10), tail(*workers)
        workers[0].signal(signal.SIGKILL)
        killed_at = time.time()
        workers[0].proc.wait(10)
        release.set()
        assert redis_client.hlen("unacked") == 1, "the batch message was never acked"

        sleep_until(killed_at + VISIBILITY + 1)
        workers.append(start_worker(path, *options, "--hostname", "w2@%h", env=env))
        assert all_delivered(receiver, accepted, timeout=40), tail(*workers)
        time.sleep(1.0)  # stragglers
        got = ok_keys(receiver)
        duplicates = {key: n - 1 for key, n in got.items() if n > 1}
        print(f"\n2xx requests: {sum(got.values())}; duplicated ids: {len(duplicates)}")
        assert set(got) == accepted  # 0 lost
        assert sum(duplicates.values()) <= 6  # at most what was in flight at the kill
        assert set(duplicates).isdisjoint(quick)  # the settled four were not sent again
        assert DeadLetterStore(redis_client, RedisKeys("pr")).count() == 0
        assert wait_until(lambda: redis_client.zcard(ledger) == 0, 10)
        assert wait_until(lambda: redis_client.hlen("unacked") == 0, 10)
    finally:
        release.set()


FAILED_ACK = re.compile(r"Couldn't ack|MaxConnectionsError|Too many connections")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("concurrency", [64, 256])
def test_a_slow_partner_at_full_gevent_concurrency_fails_no_ack_and_gets_no_duplicate(
    concurrency: int,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
) -> None:
    """Every greenlet acks its own message through the worker's broker channel, whose pool
    kombu limits to 10 connections: a burst of tasks finishing together (a slow partner answers
    them together) failed acks with MaxConnectionsError, and each failed ack left its message
    in kombu's unacked hash, to be delivered again one visibility timeout later."""
    receiver.responder = lambda req, seen: Answer(200, delay=1.5)  # below the 2 s read timeout
    path = write_destinations(destinations(receiver.url))
    total = 4 * concurrency
    results = make_producer(path).produce_many(install(f"c{concurrency}-{i}") for i in range(total))
    accepted = {d for r in results for d in r.accepted}
    assert len(accepted) == total
    worker = start_worker(
        path, "--queues", "templated", "--pool", "gevent", "--concurrency", str(concurrency),
        env=CRASH_ENV,
    )  # fmt: skip
    assert all_delivered(receiver, accepted, timeout=90), tail(worker)
    # A failed ack leaves its message unacked; kombu would restore it after the visibility
    # timeout (checking every 10 s), and it would be sent again.
    settled = wait_until(lambda: redis_client.hlen("unacked") == 0, VISIBILITY + 20)
    got = ok_keys(receiver)
    duplicates = {key: n for key, n in got.items() if n > 1}
    failed_acks = [line for line in worker.log().splitlines() if FAILED_ACK.search(line)]
    print(
        f"\nconcurrency {concurrency}: {total} deliveries, {sum(got.values())} 2xx requests, "
        f"{len(duplicates)} duplicated ids, {len(failed_acks)} failed-ack log lines"
    )
    assert failed_acks == [], "\n".join(failed_acks[:5])
    assert settled, f"{redis_client.hlen('unacked')} messages left unacked"
    assert duplicates == {}
    assert set(got) == accepted
    assert worker.proc.poll() is None


class ContinuousProducer:
    """Produces installs from a thread, about 40 a second, through one Producer object.

    An event counts as accepted only when produce() returned; one whose produce() raised is
    retried (first) until it goes through, and its ids may then come back as duplicates when the
    failed call had in fact been applied before its answer was lost.
    """

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.accepted: dict[str, float] = {}  # delivery id -> when produce() returned it
        self.late_duplicates: set[str] = set()
        self.failed: list[str] = []
        self.errors: Counter[str] = Counter()
        self.stopped = threading.Event()
        self.paused = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def produce_one(self, event_id: str) -> bool:
        try:
            result = self.producer.produce(install(event_id))
        except (redis.RedisError, OSError) as exc:
            self.errors[type(exc).__name__] += 1
            return False
        now = time.time()
        for delivery_id in result.accepted:
            self.accepted[delivery_id] = now
        self.late_duplicates.update(result.duplicates)
        return True

    def _run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            if self.paused.is_set():
                time.sleep(0.05)
                continue
            if self.failed and self.produce_one(self.failed[0]):
                self.failed.pop(0)
                continue
            event_id = f"load-{n}"
            n += 1
            if not self.produce_one(event_id):
                self.failed.append(event_id)
                time.sleep(0.1)
            time.sleep(0.02)

    def accepted_after(self, when: float) -> set[str]:
        return {d for d, t in list(self.accepted.items()) if t > when}

    def wait_accepted_after(self, when: float, count: int, timeout: float) -> bool:
        return wait_until(lambda: len(self.accepted_after(when)) >= count, timeout)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        for event_id in list(self.failed):  # what failed while Redis was down, once more
            assert self.produce_one(event_id), f"{event_id} still fails: {dict(self.errors)}"
            self.failed.remove(event_id)


def redis_crash_scenario(
    receiver: PostbackReceiver,
    path: Path,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    crashes: int,
    hold_everything: bool,
) -> None:
    """Kill -9 Redis under load ``crashes`` times, restart it from its AOF 2 s later each time,
    and count what arrives. The one worker must survive and carry on by itself.

    Redis always dies while deliveries are in flight. With ``hold_everything`` the partner
    holds every request for 1.5 s around each kill, so the worker is saturated (4 requests
    running, its prefetch full) and is not waiting on BRPOP. Otherwise only one event's request
    ("hold-N") is held and the worker is waiting on BRPOP for the next message when Redis dies.
    """
    holding = threading.Event()  # while set, every request is held
    held = threading.Semaphore(0)

    def partner(req: ReceivedRequest, seen: int) -> Answer:
        if holding.is_set() or req.path.startswith("/pb/hold-"):
            held.release()
            return Answer(200, delay=1.5)  # below the 2 s read timeout: a slow success
        return Answer(200)

    receiver.responder = partner
    servers = [EmbeddedRedis(tmp_path / "r").start()]
    url = servers[0].url
    env = {**CRASH_ENV, "POSTBACK_RELAY_REDIS_URL": url}
    workers: list[WorkerProcess] = []
    load: ContinuousProducer | None = None
    try:
        producer = leased_producer(url, path, redis.Redis.from_url(url))
        worker = start_worker(path, env=env)
        workers.append(worker)
        load = ContinuousProducer(producer)
        load.thread.start()
        assert wait_until(lambda: len(receiver.received(ok_only=True)) >= 100, 60), tail(worker)
        accepted_before_kill = len(load.accepted)
        restarted_at = 0.0
        for crash in range(crashes):
            if hold_everything:
                holding.set()
                for _ in range(4):  # all four threads are held
                    assert held.acquire(timeout=30), tail(worker)
                time.sleep(0.3)  # the prefetch fills from the backlog, then BRPOP stops
            else:
                assert load.produce_one(f"hold-{crash}")
                assert held.acquire(timeout=30), tail(worker)
                time.sleep(0.2)

            servers[-1].kill()
            holding.clear()
            if crash == 0:
                accepted_before_kill = len(load.accepted)
            time.sleep(2.0)
            servers.append(EmbeddedRedis(tmp_path / "r", port=servers[0].port).start())
            restarted_at = time.time()

            # The same Producer object recovers by itself.
            assert load.wait_accepted_after(restarted_at, count=60, timeout=30), (
                f"the producer did not recover: {dict(load.errors)}"
            )
            assert worker.proc.poll() is None, (
                f"the worker exited (exit code {worker.proc.returncode}) when Redis died "
                f"(crash {crash + 1} of {crashes})\n" + tail(worker)
            )
            load.paused.set()  # let the worker catch up, then show it delivers new events
            after_restart = load.accepted_after(restarted_at)
            assert all_delivered(receiver, after_restart, timeout=40), (
                "events produced after the Redis restart are not delivered\n" + tail(worker)
            )
            load.paused.clear()
        load.stop()

        # What the worker held when Redis died is restored once it is older than the visibility
        # timeout, by a worker that starts after that point (see the module docstring).
        sleep_until(restarted_at + VISIBILITY + 1)
        missing_before_restore = set(load.accepted) - set(ok_keys(receiver))
        workers.append(start_worker(path, "--hostname", "w2@%h", env=env))
        everything = set(load.accepted) | load.late_duplicates
        assert all_delivered(receiver, everything, timeout=60), (
            f"{len(everything - set(ok_keys(receiver)))} accepted ids never delivered\n"
            + tail(*workers)
        )
        got = ok_keys(receiver)
        duplicates = {key: n for key, n in got.items() if n > 1}
        print(
            f"\naccepted: {len(load.accepted)} ({accepted_before_kill} before the first kill); "
            f"Redis crashes: {crashes}; produce() errors: {dict(load.errors)}; retried ids "
            f"already enqueued: {len(load.late_duplicates)}; missing until the restore: "
            f"{len(missing_before_restore)}; duplicated ids: {len(duplicates)} -> {duplicates}"
        )
        assert set(got) == everything
        assert sum(load.errors.values()) > 0, "Redis died under load: some produce() must fail"
        assert worker.proc.poll() is None, tail(worker)
        assert workers[-1].proc.poll() is None, tail(workers[-1])
    finally:
        if load is not None:
            load.stopped.set()
        for w in workers:
            w.stop()
        for server in servers:
            server.stop()


@pytest.mark.timeout(150)
def test_redis_sigkill_and_restart_under_load_loses_no_accepted_event(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    path = write_destinations(destinations(receiver.url))
    redis_crash_scenario(receiver, path, start_worker, tmp_path, crashes=1, hold_everything=True)


@pytest.mark.timeout(150)
def test_redis_sigkill_while_the_worker_waits_on_brpop_the_worker_survives(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    path = write_destinations(destinations(receiver.url))
    # Three crashes: the worker dies in most single crashes of this kind, not in all.
    redis_crash_scenario(receiver, path, start_worker, tmp_path, crashes=3, hold_everything=False)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("batch_size", [1, 10])
def test_redis_sigkill_between_brpop_and_the_unacked_record_loses_nothing(
    batch_size: int,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    path = write_destinations(destinations(receiver.url))
    servers = [EmbeddedRedis(tmp_path / "r").start()]
    url = servers[0].url
    env = {
        **CRASH_ENV,
        "POSTBACK_RELAY_REDIS_URL": url,
        "POSTBACK_RELAY_BATCH_SIZE": str(batch_size),
    }
    workers: list[WorkerProcess] = []
    try:
        client = redis.Redis.from_url(url)
        producer = leased_producer(url, path, client, batch_size=batch_size)
        worker = start_worker(path, env=env)
        workers.append(worker)
        (warm,) = producer.produce(install("warm-up")).accepted
        assert all_delivered(receiver, {warm}, timeout=30), tail(worker)
        time.sleep(0.5)  # idle: the worker waits on BRPOP for the next message

        # A worker that is slow to handle BRPOP's answer (GC pause, CPU starvation): stopped.
        worker.signal(signal.SIGSTOP)
        # With batches, three deliveries in the one message BRPOP takes.
        count = 1 if batch_size == 1 else 3
        in_window = producer.produce_many(install(f"in-the-window-{i}") for i in range(count))
        ids = {d for r in in_window for d in r.accepted}
        assert len(ids) == count
        assert wait_until(lambda: client.llen(QUEUE) == 0, 5)  # BRPOP took it
        servers[0].kill()
        killed_at = time.time()
        worker.signal(signal.SIGCONT)
        time.sleep(2.0)
        servers.append(EmbeddedRedis(tmp_path / "r", port=servers[0].port).start())
        client = redis.Redis.from_url(url)
        for each in ids:  # the produce() was durable
            assert client.exists(RedisKeys("pr").dedupe(each))
        print(
            f"\nafter the restart: queue {client.llen(QUEUE)}, unacked {client.hlen('unacked')}, "
            f"first worker alive: {worker.proc.poll() is None}"
        )
        # kombu lost track of it (neither queued nor unacked); the delivery ledger did not.
        for each in ids:
            assert client.zscore(RedisKeys("pr").ledger(), each) is not None
        sleep_until(killed_at + VISIBILITY + 1)
        workers.append(start_worker(path, "--hostname", "w2@%h", env=env))
        assert all_delivered(receiver, ids, timeout=30), tail(*workers)
    finally:
        for w in workers:
            w.signal(signal.SIGCONT)
            w.stop()
        for server in servers:
            server.stop()


@pytest.mark.timeout(90)
def test_a_backlog_older_than_the_ledger_lease_drains_without_duplicates(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    """The ledger republishes a delivery that missed its deadline once its queue has drained.
    At the end of a backlog that waited longer than the lease (workers down for a deploy) the
    queue is empty while the last messages still wait in a worker's prefetch buffer, not yet
    started: republishing them then sends each twice. With the lease now minutes rather than
    hours, such backlogs are ordinary; the ledger waits until the queue has stayed drained for
    the visibility timeout, by when every message taken before is started, acked or restored."""
    lease = 10
    receiver.responder = lambda req, seen: Answer(200, delay=0.5)
    path = write_destinations(destinations(receiver.url))
    producer = leased_producer(redis_url, path, redis_client, lease)
    results = producer.produce_many(install(f"backlog-{i}") for i in range(40))
    accepted = {d for r in results for d in r.accepted}
    time.sleep(lease + 1)  # no worker yet: every deadline passes while the deliveries wait
    # 4 at a time, 16 prefetched: the queue drains about 2 s before the last delivery starts.
    # (The threads pool queues what it prefetched; gevent's blocks the consumer until a slot
    # is free, so its window is one task long, and the ledger's hold covers both.)
    worker = start_worker(
        path, "--queues", "templated", "--pool", "threads", "--concurrency", "4",
        env={**CRASH_ENV, "POSTBACK_RELAY_LEDGER_LEASE": str(lease)},
    )  # fmt: skip
    assert all_delivered(receiver, accepted, timeout=40), tail(worker)
    time.sleep(3 * max(1.0, lease / 10))  # sweeps that would republish have run by now
    got = ok_keys(receiver)
    duplicates = {key: n for key, n in got.items() if n > 1}
    assert duplicates == {}, f"{len(duplicates)} sent twice\n" + tail(worker)
    assert set(got) == accepted
    assert wait_until(lambda: redis_client.zcard(RedisKeys("pr").ledger()) == 0, 10)


def produce_poison_then_a_normal_event(
    messages: list[bytes | str],
    receiver: PostbackReceiver,
    path: Path,
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
) -> tuple[WorkerProcess, DeadLetterStore, list[DeadLetter]]:
    """LPUSH the poison, then produce one good event; wait for both to be dealt with."""
    producer = make_producer(path)
    worker = start_worker(path, env=CRASH_ENV)
    for message in messages:
        redis_client.lpush(QUEUE, message)
    (delivery_id,) = producer.produce(install("after-poison")).accepted
    store = DeadLetterStore(redis_client, RedisKeys("pr"))
    wait_until(
        lambda: (
            (delivery_id in ok_keys(receiver) and store.count() >= len(messages))
            or worker.proc.poll() is not None
        ),
        30,
    )
    time.sleep(0.5)  # nothing more may arrive
    entries = list(store.iter_entries())
    print("\n" + "\n".join(f"{e.delivery_id}: {e.reason}" for e in entries))
    assert worker.proc.poll() is None, "the worker died\n" + tail(worker)
    assert ok_keys(receiver) == Counter({delivery_id: 1}), tail(worker)
    assert len(entries) == len(messages), tail(worker)
    assert all(e.reason.startswith("poison message: ") for e in entries)
    assert all(e.envelope is None and e.raw_message for e in entries)
    assert redis_client.llen(QUEUE) == 0
    # Acked: written by the next acks, or by the timer once the worker idles (1 s).
    assert wait_until(lambda: redis_client.hlen("unacked") == 0, 3)
    # Still consuming afterwards.
    (second,) = producer.produce(install("after-poison-2")).accepted
    assert wait_until(lambda: second in ok_keys(receiver), 30), tail(worker)
    assert store.count() == len(messages)
    return worker, store, entries


def test_poison_task_messages_are_dead_lettered_and_the_worker_keeps_consuming(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
) -> None:
    encoder = TaskMessageEncoder(celery.Celery("x", set_as_current=False))
    missing_fields = encoder.encode(
        "postback_relay.deliver_templated", QUEUE, ({"nonsense": 1},), argsrepr="x"
    )
    unknown_task = encoder.encode(
        "postback_relay.no_such_task", QUEUE, ({"nonsense": 2},), argsrepr="y"
    )
    # A kombu message whose body (base64) does not decode to JSON.
    undecodable_body = json.loads(
        encoder.encode("postback_relay.deliver_templated", QUEUE, ({},), argsrepr="z")
    )
    undecodable_body["body"] = base64.b64encode(b"\x00\xff not json").decode()
    _, _, entries = produce_poison_then_a_normal_event(
        [missing_fields, unknown_task, json.dumps(undecodable_body)],
        receiver,
        write_destinations(destinations(receiver.url)),
        make_producer,
        start_worker,
        redis_client,
    )
    reasons = " | ".join(e.reason for e in entries)
    # Each reason says what was wrong, not just "poison message".
    invalid = [e for e in entries if "envelope" in e.reason]
    assert len(invalid) == 1, reasons
    assert "delivery_id" in invalid[0].reason, reasons
    assert "nonsense" in invalid[0].reason, reasons
    assert "nonsense" in (invalid[0].raw_message or "")
    unknown = [e for e in entries if "unknown task" in e.reason]
    assert len(unknown) == 1, reasons
    assert "postback_relay.no_such_task" in unknown[0].reason, reasons
    assert sum("decode" in e.reason for e in entries) == 1, reasons


def test_a_poison_member_of_a_batch_is_dead_lettered_alone_and_its_batch_mates_delivered(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    path = write_destinations(destinations(receiver.url))
    producer = leased_producer(redis_url, path, redis_client, batch_size=10)
    producer.produce_many(install(f"mate-{i}") for i in range(2))
    (wire,) = redis_client.lrange(QUEUE, 0, -1)
    _, (members,) = decode_task_args(wire.decode())
    mates = {m["delivery_id"] for m in members}
    # The same batch with a member that is no envelope.
    encoder = TaskMessageEncoder(celery.Celery("x", set_as_current=False))
    jsons = [json.dumps(m) for m in members] + ['{"nonsense": 1}']
    poisoned = encoder.encode_batch("templated", jsons, [DESTINATION, DESTINATION, "?"], "b-1")
    redis_client.delete(QUEUE)
    redis_client.lpush(QUEUE, poisoned)
    store = DeadLetterStore(redis_client, RedisKeys("pr"))

    worker = start_worker(path, env={**CRASH_ENV, "POSTBACK_RELAY_BATCH_SIZE": "10"})
    assert all_delivered(receiver, mates, timeout=30), tail(worker)
    assert wait_until(lambda: store.count() == 1, 10), tail(worker)
    (entry,) = store.iter_entries()
    assert entry.reason.startswith("poison message: envelope"), entry.reason
    assert "nonsense" in (entry.raw_message or "")
    assert entry.delivery_id == "poison-b-1.2"
    (after,) = producer.produce(install("after-poison")).accepted
    assert wait_until(lambda: after in ok_keys(receiver), 30), tail(worker)
    assert ok_keys(receiver) == Counter(dict.fromkeys([*mates, after], 1))
    assert wait_until(lambda: redis_client.hlen("unacked") == 0, 10)
    assert worker.proc.poll() is None


def test_queue_items_celery_cannot_read_are_dead_lettered_raw_and_the_worker_goes_on(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    """kombu pops an item before it can tell it is not a message, and Celery fails a message
    whose args are not a list before the task runs: each is kept in the dead-letter store as
    the raw item that was on the queue (produce() never writes such items)."""
    encoder = TaskMessageEncoder(celery.Celery("x", set_as_current=False))
    garbage = b"\x00\xffthis is {not json"
    not_kombu = json.dumps({"task": "postback_relay.deliver_templated", "args": [1]}).encode()
    string_args = encoder._wire(
        "postback_relay.deliver_templated", QUEUE, json.dumps("abc"), "'abc'", None
    ).encode()
    two_args = encoder.encode("postback_relay.deliver_templated", QUEUE, ({}, 2), "({}, 2)")
    path = write_destinations(destinations(receiver.url))
    worker, store, entries = produce_poison_then_a_normal_event(
        [garbage, not_kombu, string_args, two_args.encode()],
        receiver, path, make_producer, start_worker, redis_client,
    )  # fmt: skip
    (kept_garbage,) = [e for e in entries if e.raw_bytes() == garbage]
    (kept_not_kombu,) = [e for e in entries if e.raw_bytes() == not_kombu]
    # A message kombu decoded is kept as kombu's envelope (the same JSON, keys in its order).
    (kept_string_args,) = [e for e in entries if as_json(e) == json.loads(string_args)]
    (kept_two_args,) = [e for e in entries if as_json(e) == json.loads(two_args)]
    assert "arguments do not fit postback_relay.deliver_templated" in kept_two_args.reason
    assert all(e.queue == QUEUE for e in entries)
    assert kept_garbage.raw_encoding == "base64"  # not UTF-8 text
    assert kept_not_kombu.raw_encoding == kept_string_args.raw_encoding == "utf-8"
    assert "not JSON" in kept_garbage.reason
    assert "not a kombu message" in kept_not_kombu.reason
    assert "args must be a list" in kept_string_args.reason
    alarms = [line for line in json_lines(worker) if line.get("alarm") is True]
    assert len(alarms) == 4, tail(worker)

    # On-call sees them, can look at one, and purge them.
    env = cli_env(redis_url, path)
    listed = run_cli(env, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    for entry in entries:
        assert entry.delivery_id in listed.stdout, listed.stdout
    shown = run_cli(env, "dlq", "show", kept_not_kombu.delivery_id)
    assert shown.returncode == 0, shown.stderr
    assert "postback_relay.deliver_templated" in shown.stdout
    assert QUEUE in shown.stdout
    purged = run_cli(env, "dlq", "purge", "--reason", "poison message", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert store.count() == 0


def as_json(entry: DeadLetter) -> Any:
    try:
        return json.loads(entry.raw_bytes() or b"")
    except ValueError:
        return None


def json_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in worker.log().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.mark.timeout(120)
def test_a_message_that_kills_its_worker_is_dead_lettered_not_looped(
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
    redis_client: redis.Redis,
) -> None:
    visibility = 8
    # connect + read (5) < soft (6) < hard (7) < visibility (8): the worker is killed while its
    # request is held, well inside the 5 s HTTP bound.
    env = {
        "POSTBACK_RELAY_VISIBILITY_TIMEOUT": str(visibility),
        "POSTBACK_RELAY_TASK_SOFT_TIME_LIMIT": "6",
        "POSTBACK_RELAY_TASK_TIME_LIMIT": "7",
        "POSTBACK_RELAY_HTTP_CONNECT_TIMEOUT": "1",
        "POSTBACK_RELAY_HTTP_READ_TIMEOUT": "4",
        "POSTBACK_RELAY_MAX_UNFINISHED_STARTS": "2",
    }
    arrivals: list[float] = []
    arrived = threading.Semaphore(0)
    release = threading.Event()

    def hold_the_killer(req: ReceivedRequest, seen: int) -> Answer:
        if req.path == "/pb/killer":
            arrivals.append(time.time())
            arrived.release()
            release.wait(120)  # held until the test ends (finally: release.set())
        return Answer(200)

    receiver.responder = hold_the_killer
    # A held request's client is SIGKILLed: its late answer meets a closed socket. Expected here.
    receiver.server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    path = write_destinations(destinations(receiver.url, read=4))
    producer = make_producer(path)
    (killer,) = producer.produce(install("killer")).accepted
    assert killer == delivery_id_for("killer", DESTINATION)
    store = DeadLetterStore(redis_client, RedisKeys("pr"))
    workers: list[WorkerProcess] = []
    try:
        for round_ in range(2):  # MAX_UNFINISHED_STARTS = 2 deaths mid-delivery
            if round_:
                sleep_until(arrivals[-1] + visibility + 1.5)
            worker = start_worker(path, env=env)
            workers.append(worker)
            assert arrived.acquire(timeout=40), f"start {round_ + 1} never came\n" + tail(worker)
            worker.signal(signal.SIGKILL)
            worker.proc.wait(10)
        sleep_until(arrivals[-1] + visibility + 1.5)
        last = start_worker(path, env=env)
        workers.append(last)
        assert wait_until(lambda: store.get(killer) is not None, 40), tail(last)
        entry = store.get(killer)
        assert entry is not None
        print(f"\nstarts: {len(arrivals)}; dead letter: {entry.reason}")
        assert "without finishing" in entry.reason
        assert "started 2 times" in entry.reason
        assert entry.envelope is not None
        assert entry.envelope.delivery_id == killer
        assert entry.envelope.attempt == 0

        # The third start dead-lettered it without another request; nothing loops on.
        (after,) = producer.produce(install("after-killer")).accepted
        assert wait_until(lambda: after in ok_keys(receiver), 30), tail(last)
        time.sleep(1.0)
        assert len(arrivals) == 2
        assert store.count() == 1
        assert redis_client.llen(QUEUE) == 0
        assert redis_client.zcard(RedisKeys("pr").delayed(QUEUE)) == 0
        assert ok_keys(receiver) == Counter({after: 1})
        assert last.proc.poll() is None
    finally:
        release.set()
