"""Losing the Redis master under load: one master, two replicas, three Sentinels (real
redis-server processes), two worker processes and a producer process producing steadily, all on
``sentinel://`` (the data nodes and the Sentinels each with their own password). The master is SIGKILLed mid-stream; the Sentinels promote a replica; the
workers and the producer follow it without a restart.

With POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS=1 every event whose produce() returned is delivered
or dead-lettered: 0 lost. Without it, Redis's asynchronous replication may lose writes the old
master had acknowledged; the test prints how many accepted events the failover lost (possibly
none) and holds the accounting to add up. Both print the seconds without a delivery around the
failover and the duplicates (deliveries the new master did not know were done go out again,
with the same idempotency key).

On one machine replication takes well under a millisecond, so a plain kill rarely catches an
accepted event on the master alone. The "replication-cut" cases make that window real: the
replicas' link fails half a second before the master dies, behind a partner slower than the
producer (a backlog on the queue). What the master accepted in that half second and had not
delivered is what a failover without WAIT loses.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import kombu
import pytest
import redis

from config.keys import RedisKeys, queue_for
from schemas.envelope import delivery_id_for
from tests.conftest import WorkerProcess
from tests.failure.test_crashes import destinations, tail
from tests.helpers import ROOT, wait_until
from workers import redis_clients
from workers.dev.receiver import Answer, PostbackReceiver
from workers.dev.redis_topology import Node, RedisTopology
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

QUEUE = queue_for("templated")
KEYS = RedisKeys("pr")
DESTINATION = "crash-net"
EVENTS = 500
RATE = 50  # events a second: about 10 s of producing
KILL_AFTER_DELIVERED = 100
CONCURRENCY = 4
PARTNER_DELAY = 0.25  # with the replication cut: 2 x 4 / 0.25 = 32 deliveries/s < RATE
VISIBILITY = 6
# The data nodes and the Sentinels each require their own password, across the failover too.
DATA_PASSWORD = "data-pw-4f1c"
SENTINEL_PASSWORD = "sentinel-pw-9a7e"
# Timeouts nest: connect + read (2) < soft (3) < hard (4) < visibility (6); the ledger's
# shortest lease, so what the new master still lists as unfinished goes out again soon.
ENV = {
    "POSTBACK_RELAY_VISIBILITY_TIMEOUT": str(VISIBILITY),
    "POSTBACK_RELAY_TASK_SOFT_TIME_LIMIT": "3",
    "POSTBACK_RELAY_TASK_TIME_LIMIT": "4",
    "POSTBACK_RELAY_HTTP_CONNECT_TIMEOUT": "1",
    "POSTBACK_RELAY_HTTP_READ_TIMEOUT": "1",
    "POSTBACK_RELAY_LEDGER_LEASE": "10",
    # Redis commands to a dead master fail within a second rather than the default ten.
    "POSTBACK_RELAY_REDIS_SOCKET_TIMEOUT": "1",
    "POSTBACK_RELAY_REDIS_CONNECT_TIMEOUT": "1",
}


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[RedisTopology]:
    with RedisTopology(
        tmp_path / "redis",
        replicas=2,
        sentinels=3,
        password=DATA_PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
    ) as started:
        yield started


class ProducerProcess:
    """tests/failure/steady_producer.py in its own process group; killed at teardown."""

    def __init__(self, env: dict[str, str], out: Path, prefix: str) -> None:
        self.out = out
        self.log_path = out.with_suffix(".log")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.failure.steady_producer", str(out), prefix,
                 str(EVENTS), str(RATE)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            )  # fmt: skip

    def lines(self) -> list[list[str]]:
        if not self.out.exists():
            return []
        return [line.split() for line in self.out.read_text().splitlines() if line]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass(frozen=True)
class Account:
    """What the producer was told, what the partner received, what the new master holds."""

    tried: set[str]  # event ids produce() was called for
    accepted: set[str]  # ... whose produce() returned
    produce_errors: Counter[str]  # error type -> count (the producer retried each)
    delivered: Counter[str]  # event id -> 2xx requests
    dead: set[str]  # event ids in the dead-letter store
    arrivals: list[float]  # every 2xx request's arrival time

    @property
    def lost(self) -> set[str]:
        return self.accepted - set(self.delivered) - self.dead

    @property
    def duplicates(self) -> int:
        return sum(self.delivered.values()) - len(self.delivered)

    def resumed(self, promoted_at: float) -> float:
        """When the first delivery after the promotion arrived."""
        return min((t for t in self.arrivals if t > promoted_at), default=promoted_at)

    def silence_around(self, killed_at: float, promoted_at: float) -> float:
        """The longest wait between two deliveries from a second before the kill until the
        first delivery after the promotion (the kill itself counts as a delivery, so a silence
        that starts there is measured too; the tail of the run is not)."""
        resumed = self.resumed(promoted_at)
        times = sorted([killed_at, *(t for t in self.arrivals if killed_at - 1 <= t <= resumed)])
        return max(b - a for a, b in itertools.pairwise(times))


def account(producer: ProducerProcess, receiver: PostbackReceiver, master: Node) -> Account:
    lines = producer.lines()
    ok = [r for r in receiver.received(ok_only=True)]
    assert all(
        r.headers["X-Idempotency-Key"] == delivery_id_for(r.path.removeprefix("/pb/"), DESTINATION)
        for r in ok
    ), "a request's idempotency key is not its event's"
    dead = {
        e.envelope.event.event_id or ""
        for e in DeadLetterStore(master.client(5), KEYS).iter_entries()
        if e.envelope is not None
    }
    return Account(
        tried={line[1] for line in lines if line[0] == "try"},
        accepted={line[1] for line in lines if line[0] == "ok"},
        produce_errors=Counter(line[2] for line in lines if line[0] == "error"),
        delivered=Counter(r.path.removeprefix("/pb/") for r in ok),
        dead=dead,
        arrivals=sorted(r.at for r in ok),
    )


class Settled:
    """Nothing is left to deliver on ``master``, and nothing arrived for two seconds; ``last``
    says what was still pending at the last look (for the failure message)."""

    def __init__(self, master: Node, receiver: PostbackReceiver) -> None:
        self.master = master
        self.receiver = receiver
        self.last = "not looked at yet"

    def __call__(self) -> bool:
        try:
            client = self.master.client(2)
            pending = {
                "queue": client.llen(QUEUE),
                "unacked": client.hlen("unacked"),
                "ledger": client.zcard(KEYS.ledger()),
                "delayed": client.zcard(KEYS.delayed(QUEUE)),
            }
        except redis.RedisError as exc:
            self.last = f"the new master did not answer: {exc}"
            return False
        arrivals = self.receiver.received()
        quiet = time.time() - arrivals[-1].at if arrivals else None
        self.last = f"pending on the new master {pending}; last arrival {quiet} s ago"
        return not any(pending.values()) and (quiet is None or quiet > 2)


def signal_replicas(topology: RedisTopology, master: Node, sig: int) -> None:
    for node in topology.nodes:
        if node.port != master.port and node.process is not None:
            os.kill(node.process.pid, sig)


def cut_replication(topology: RedisTopology) -> Node:
    """From now on what the master accepts stays on the master alone, as when its replicas'
    link fails shortly before the master itself: the replicas are stopped (so they cannot
    connect again) and the master drops their connections (a stopped process's socket would
    still take in what the master sends)."""
    master = topology.master()
    signal_replicas(topology, master, signal.SIGSTOP)
    master.client().client_kill_filter(_type="replica")
    return master


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("wait_replicas", "cut"),
    [(1, 0.0), (0, 0.0), (1, 0.5), (0, 0.5)],
    ids=["wait-for-1-replica", "no-wait", "wait-replication-cut", "no-wait-replication-cut"],
)
def test_a_sigkilled_master_fails_over_under_load_and_accepted_events_are_delivered(
    wait_replicas: int,
    cut: float,
    topology: RedisTopology,
    receiver: PostbackReceiver,
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    started = time.time()
    if cut:
        # A partner slower than the producer: a backlog waits on the queue when the master
        # dies, where whatever never reached a replica can be lost.
        receiver.responder = lambda req, seen: Answer(200, delay=PARTNER_DELAY)
    path = write_destinations(destinations(receiver.url, read=1))
    env = {
        **ENV,
        "POSTBACK_RELAY_REDIS_URL": topology.sentinel_url(),
        "POSTBACK_RELAY_REDIS_SENTINEL_MASTER": topology.master_name,
        "POSTBACK_RELAY_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        "POSTBACK_RELAY_PRODUCE_WAIT_REPLICAS": str(wait_replicas),
        "POSTBACK_RELAY_PRODUCE_WAIT_TIMEOUT_MS": "1000",
    }
    options = ["--queues", "templated", "--pool", "gevent", "--concurrency", str(CONCURRENCY)]
    workers = [
        start_worker(path, *options, "--hostname", f"w{n}@%h", env=env, ready=False) for n in (1, 2)
    ]
    for worker in workers:
        worker.wait_ready()
    producer = ProducerProcess(
        {**os.environ, "POSTBACK_RELAY_DESTINATIONS_FILE": str(path), **env},
        tmp_path / "produced.txt",
        f"fo{wait_replicas}",
    )
    try:
        assert wait_until(lambda: len(receiver.received()) >= KILL_AFTER_DELIVERED, 30), (
            tail(*workers) + producer.log_path.read_text()
        )
        if cut:  # replication fails ``cut`` seconds before the master dies
            cut_replication(topology)
            time.sleep(cut)
        old = topology.kill_master()
        killed_at = time.time()
        signal_replicas(topology, old, signal.SIGCONT)
        accepted_at_kill = sum(1 for line in producer.lines() if line[0] == "ok")
        new = topology.wait_promoted(old, 30)
        promoted_at = time.time()

        assert producer.proc.wait(60) == 0, producer.log_path.read_text()[-3000:]
        produced_at = time.time()
        # 15 to 20 s on 2 cores with two CPU-bound processes beside it (a backlog behind a slow
        # partner, then what the new master still lists comes back after the visibility
        # timeout and the ledger lease); the suite runs two tests at once, which can double it.
        settled = Settled(new, receiver)
        assert wait_until(settled, 75, interval=0.2), f"{settled.last}\n{tail(*workers)}"
    finally:
        producer.kill()
    got = account(producer, receiver, new)
    print(
        f"\nWAIT {wait_replicas} replica(s), replication cut {cut:g} s before the kill: "
        f"{len(got.accepted)} events accepted "
        f"({accepted_at_kill} before the kill); produce() errors retried: "
        f"{dict(got.produce_errors)}; promoted {promoted_at - killed_at:.1f} s after the kill; "
        f"longest time without a delivery around the failover: "
        f"{got.silence_around(killed_at, promoted_at):.1f} s (deliveries resumed "
        f"{got.resumed(promoted_at) - promoted_at:.1f} s after the promotion); delivered {len(got.delivered)} distinct, "
        f"{got.duplicates} duplicate requests; dead-lettered {len(got.dead)}; "
        f"accepted and lost: {len(got.lost)}; settled {time.time() - produced_at:.1f} s after "
        f"the last produce; test {time.time() - started:.0f} s"
    )
    # The workers and the producer followed the new master without a restart.
    for worker in workers:
        assert worker.proc.poll() is None, tail(worker)
    for log in [*(w.log() for w in workers), producer.log_path.read_text()]:
        assert DATA_PASSWORD not in log
        assert SENTINEL_PASSWORD not in log
    assert got.accepted == got.tried, "the producer gave up on an event"
    assert len(got.accepted) == EVENTS
    assert accepted_at_kill < EVENTS, "the kill must land mid-stream"
    assert any(t > promoted_at for t in got.arrivals), "nothing delivered after the failover"
    # The accounting adds up: nothing delivered that was not produced, and every accepted
    # event is delivered, dead-lettered or counted lost.
    assert set(got.delivered) | got.dead <= got.tried
    assert len(got.accepted) == len(got.accepted & (set(got.delivered) | got.dead)) + len(got.lost)
    if wait_replicas:
        assert got.lost == set(), f"{len(got.lost)} accepted events lost: {sorted(got.lost)[:10]}"


@pytest.mark.timeout(60)
def test_a_worker_connection_opened_during_a_failover_waits_for_the_promoted_master(
    topology: RedisTopology,
) -> None:
    """Celery opens the broker connection again once after an error, then backs off 2, 4, 6 s;
    our transport keeps looking for the master on sentinel:// until one is promoted."""
    options = redis_clients.kombu_connection_options(topology.redis_settings())
    old = topology.kill_master()
    with kombu.Connection(
        options["broker_url"],
        transport=options["broker_transport"],
        transport_options=options["broker_transport_options"],
    ) as connection:
        connection.connect()  # no retries of kombu's or Celery's: the first attempt
        channel = connection.default_channel
        with channel.conn_or_acquire() as client:
            assert client.info("replication")["role"] == "master"
            assert client.connection_pool.get_master_address()[1] != old.port
