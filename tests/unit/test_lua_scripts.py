"""Lua scripts as files: each names every key it touches in its header, and touches no other.

The header is read statically (every KEYS[n]/ARGV[n] the code uses is declared); the keys are
checked on a real Redis with MONITOR: every command a script runs may touch only keys its call
passed in KEYS (what Redis Cluster requires, and what the header promises).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import limits
import pytest
import redis
from celery import Celery

from config.keys import RedisKeys, queue_for
from producers.produce import Producer
from schemas.envelope import DeliveryEnvelope
from tests.helpers import NOW_AND_LATER
from tests.unit.test_xmp import live_event, xmp_dest
from workers.broker.keys import queue_list
from workers.broker.publish import Enqueue, EnqueueOnce
from workers.broker.scripts import load_script, script_text
from workers.broker.wire import TaskMessageEncoder, decode_task_args
from workers.delivery.client import HttpClient
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.delivery.sender import Sender
from workers.kinds.xmp.aggregate import XmpAggregator
from workers.kinds.xmp.flush import FlushReport, XmpFlusher
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("workers", "producers", "config", "schemas")
SCRIPTS = sorted(p for top in PACKAGES for p in (ROOT / top).glob("**/lua/*.lua"))
SNIPPETS = {"kombu_publish"}  # included by other scripts, never run alone

KEYS = RedisKeys("pr")
QUEUE = queue_for("templated")


def _package_and_name(path: Path) -> tuple[str, str]:
    return ".".join(path.parent.parent.relative_to(ROOT).parts), path.stem


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("--") or line.startswith("--@include"):
            break
        lines.append(line)
    return lines


def _declared(header: list[str], table: str) -> tuple[set[int], list[int], bool]:
    """Literal indices, open ranges' starts ("n.."), and whether any pattern ("2i+1") is declared."""
    literal: set[int] = set()
    ranges: list[int] = []
    pattern = False
    for line in header:
        for spec in re.findall(rf"^-- {table}\[([^\]]+)\]", line):
            if spec.isdigit():
                literal.add(int(spec))
            elif m := re.fullmatch(r"(\d+)\.\.", spec):
                ranges.append(int(m.group(1)))
            else:
                pattern = True
    return literal, ranges, pattern


def test_there_are_scripts_and_every_one_ships_as_package_data() -> None:
    assert len(SCRIPTS) >= 10
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"*" = ["py.typed", "lua/*.lua"]' in pyproject
    for path in SCRIPTS:
        # The package-data glob is relative to a package: lua/ must sit right inside one.
        assert (path.parent.parent / "__init__.py").exists(), path


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_has_a_header_declaring_each_key_and_argument_it_uses(path: Path) -> None:
    text = path.read_text()
    header = _header(text)
    assert header, "no header"
    assert header[0].startswith(f"-- {path.name}: "), "first line: its name and role"
    body = "\n".join(line.split("--", 1)[0] for line in text.splitlines()[len(header) :])
    for table in ("KEYS", "ARGV"):
        assert any(re.match(rf"^-- {table}[\[:]", line) for line in header), f"{table} missing"
        literal, ranges, pattern = _declared(header, table)
        for index in re.findall(rf"\b{table}\[(\d+)\]", body):
            n = int(index)
            assert n in literal or any(n >= start for start in ranges), f"{table}[{n}] undeclared"
        dynamic = re.findall(rf"\b{table}\[([^\]\d][^\]]*)\]", body) + re.findall(
            rf"#{table}\b", body
        )
        if dynamic:
            assert ranges or pattern, f"{table} indexed by {dynamic} but no range is declared"
    if "{prefix}" not in "\n".join(header) or "kombu" not in "\n".join(header):
        return
    # A script touching our keys and kombu's lists says it needs a single-slot Redis.
    assert "single-node or Sentinel" in "\n".join(header)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_loads_through_the_loader_and_compiles(
    path: Path, redis_client: redis.Redis
) -> None:
    package, name = _package_and_name(path)
    text = script_text(package, name)
    assert not re.search(r"^--@include", text, re.MULTILINE)
    if name not in SNIPPETS:
        assert redis_client.script_load(text) == load_script(redis_client, package, name).sha


class ScriptKeyWatch:
    """Redis MONITOR over one client's calls: the keys each script touched and declared."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.ran: set[str] = set()  # SHAs of the scripts seen running

    def check(self, action: Callable[[], object]) -> None:
        """Run ``action``; fail if a script it called touched a key its call did not declare."""
        marker = f"end-{time.monotonic_ns()}"
        with self.client.monitor() as monitor:
            action()
            self.client.echo(marker)
            declared: set[str] = set()
            touched: list[tuple[str, list[str]]] = []
            while True:
                raw = monitor.connection.read_response()
                line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                source = re.search(r"\[\d+ ([^\]]+)\]", line)
                args = [_unquote(a) for a in re.findall(r'"((?:\\.|[^"\\])*)"', line)]
                if not args or source is None:
                    continue
                if args[0].upper() == "ECHO" and args[1:] == [marker]:
                    break
                if args[0].upper() == "EVALSHA":
                    self.ran.add(args[1])
                    declared.update(args[3 : 3 + int(args[2])])
                elif source.group(1) == "lua":
                    touched.append((args[0], args))
        for command, args in touched:
            keys = [k.decode() if isinstance(k, bytes) else k for k in self._keys_of(args)]
            assert set(keys) <= declared, f"{command} touched {keys}, declared {sorted(declared)}"

    def _keys_of(self, args: list[str]) -> list[bytes | str]:
        if args[0].upper() == "TIME":  # a script's clock (reserve.lua): no key at all
            return []
        return list(self.client.command_getkeys(*args))


def _unquote(text: str) -> str:
    return re.sub(r'\\(["\\])', r"\1", text)


@pytest.fixture
def watch(redis_client: redis.Redis) -> ScriptKeyWatch:
    return ScriptKeyWatch(redis_client)


def test_every_script_touches_only_the_keys_its_call_declares(
    watch: ScriptKeyWatch,
    redis_client: redis.Redis,
    redis_url: str,
    make_producer: Callable[[Path], Producer],
    write_destinations: Callable[[str], Path],
) -> None:
    producer = make_producer(write_destinations(NOW_AND_LATER))
    watch.check(lambda: producer.produce({
        "event_id": "e1", "app_id": "id1", "platform": "ios", "event_name": "install",
        "event_time": "2026-11-22T10:00:00Z",
    }))  # fmt: skip
    delays = DelaySet(redis_client, KEYS)
    watch.check(lambda: delays.move_due([QUEUE], now=time.time() + 3600))
    wire = redis_client.lpop(queue_list(QUEUE))
    assert wire is not None
    envelope = DeliveryEnvelope.from_task_arg(decode_task_args(wire.decode())[1][0])

    # Due deliveries moved in one batch message (POSTBACK_RELAY_BATCH_SIZE > 1).
    encoder = TaskMessageEncoder(Celery(set_as_current=False))
    grouping = DelaySet(redis_client, KEYS, batch_size=10, encoder=encoder)
    for n in range(2):
        grouping.schedule(QUEUE, encoder.encode_envelope(envelope, f"t-{n}"), due=0)
    watch.check(lambda: grouping.move_due([QUEUE]))
    assert redis_client.rpop(queue_list(QUEUE)) is not None

    # A delivery on a queue the sweeping worker does not watch: the sweep must declare it too.
    other = queue_for("x_mact")
    ledger = DeliveryLedger(redis_client, KEYS, lease_seconds=1)
    with redis_client.pipeline() as pipe:
        ledger.park(pipe, "d-other", other, wire.decode(), due=0)
        ledger.park(pipe, envelope.delivery_id, QUEUE, wire.decode(), due=0)
        pipe.execute()
    watch.check(lambda: ledger.sweep(now=time.time() + 10, queues=[QUEUE]))
    assert redis_client.llen(queue_list(other)) == 1  # its queue was empty: published again
    enqueue = EnqueueOnce(redis_client, KEYS, 60)
    item = Enqueue(KEYS.dedupe("d-2"), QUEUE, False, time.time(), wire.decode(), "d-2", QUEUE)
    watch.check(lambda: enqueue([item], 60))

    store = DeadLetterStore(redis_client, KEYS)
    watch.check(lambda: store.add_envelope(envelope, "HTTP 400"))
    entry = store.get(envelope.delivery_id)
    assert entry is not None
    watch.check(lambda: store.replay_one(entry, envelope, wire.decode()))
    store.add_envelope(envelope, "HTTP 400")
    watch.check(lambda: store.remove(entry))

    limiter = GlobalRateLimiter(redis_client, KEYS)
    watch.check(lambda: limiter.tighten("now", 1, time.time() + 60))
    # A reservation under both the destination's own limit and the partner's budget.
    watch.check(lambda: limiter.reserve("now", limits.parse("5/second"), server_budget=True))
    pauses = PauseRegistry(redis_client, KEYS)
    watch.check(lambda: pauses.pause("now", 30, "HTTP 429"))

    # XMP: count one event into its record, then mark the record sent.
    now = datetime.now(UTC)
    xmp = xmp_dest()
    watch.check(lambda: XmpAggregator(redis_client, KEYS).add(xmp, live_event(now), now))
    flusher = XmpFlusher(
        redis_client, KEYS, Sender(HttpClient("test")), dead_letters=store, pauses=pauses
    )
    pending = flusher.pending(xmp)
    assert len(pending) == 1
    watch.check(lambda: flusher._sent(xmp, pending, FlushReport(), None))
    assert flusher.pending(xmp) == []

    expected = {
        load_script(redis_client, *_package_and_name(path)).sha
        for path in SCRIPTS
        if path.stem not in SNIPPETS
    }
    assert expected <= watch.ran, "a script file is not exercised here: add a call above"
