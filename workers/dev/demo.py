"""`postback-relay demo`: the whole system on one machine with nothing installed but this package.

Starts (unless REDIS_URL is set) a real redis-server with AOF on, a local receiver standing in
for three partners, a worker process and Flower; produces sample events; shows deliveries live;
then stops every process it started.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from config.destinations import load_destinations
from config.keys import RedisKeys
from config.settings import Settings
from producers.produce import Producer
from workers import redis_clients
from workers.dev.embedded_redis import EmbeddedRedis, free_port, redis_answers
from workers.dev.receiver import Answer, PostbackReceiver, ReceivedRequest
from workers.stores.deadletter import DeadLetterStore

PATHS = {"network-installs": "/installs", "network-events": "/events", "analytics-flaky": "/flaky"}

DESTINATIONS_TEMPLATE = Path(__file__).parent / "demo_destinations.toml"

_EVENTS = ["install", "install", "af_purchase", "af_level_achieved", "af_tutorial_completion"]
_SOURCES = ["applovin_int", "unityads_int", "googleadwords_int", "Facebook Ads", "tiktokglobal_int"]


def sample_event(rng: random.Random) -> dict[str, Any]:
    platform = rng.choice(["ios", "android"])
    name = rng.choice(_EVENTS)
    now = datetime.now(UTC)
    event: dict[str, Any] = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "app_id": "id1234567890" if platform == "ios" else "com.example.puzzle",
        "platform": platform,
        "event_name": name,
        "event_time": now.isoformat(),
        "install_time": (now - timedelta(minutes=rng.randint(0, 600))).isoformat(),
        "country": rng.choice(["US", "DE", "BR", "JP", "IN"]),
        "ip": f"203.0.113.{rng.randint(1, 254)}",
        "media_source": rng.choice(_SOURCES),
        "campaign": "winter_sale",
        "campaign_id": str(rng.randint(1000, 9999)),
        "click_id": uuid.UUID(int=rng.getrandbits(128)).hex,
        "touch_type": "click",
    }
    device = str(uuid.UUID(int=rng.getrandbits(128))).upper()
    event["idfa" if platform == "ios" else "gaid"] = device
    if name == "af_purchase":
        price = rng.choice(["0.99", "4.99", "9.99"])
        event.update(
            revenue=price,
            currency="USD",
            revenue_usd=price,
            event_values={"af_content_id": "gems_500", "af_quantity": 1},
        )
    elif name == "af_level_achieved":
        event["event_values"] = {"af_level": rng.randint(2, 40)}
    return event


class _FlakyPartner:
    """/flaky answers 503 to the first two attempts of one delivery in four, then 200: the
    demo shows retries succeeding, never running out (the demo's retry budget is 4)."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, request: ReceivedRequest, seen: int) -> Answer:
        key = request.headers.get("X-Idempotency-Key", "")
        if request.path == "/flaky" and int(hashlib.sha1(key.encode()).hexdigest(), 16) % 4 == 0:  # noqa: S324
            with self.lock:
                self.failures[key] += 1
                if self.failures[key] <= 2:
                    return Answer(503, '{"error":"try later"}')
        return Answer()


class _Processes:
    """Child processes in their own sessions, so stopping one stops all its children too."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.children: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
            [sys.executable, "-m", "workers.cli.main", *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.children.append(proc)
        return proc

    def stop_all(self, grace: float = 15.0) -> None:
        for proc in self.children:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


class _Tally:
    """Per-destination figures: produced (from produce()), delivered (receiver), dead letters."""

    def __init__(self, receiver: PostbackReceiver, dead_letters: DeadLetterStore) -> None:
        self.receiver = receiver
        self.dead_letters = dead_letters
        self.produced: Counter[str] = Counter()
        self.dead_before = Counter(d.destination for d in dead_letters.iter_entries())
        self.rows: dict[str, tuple[int, int, int, int]] = {}

    def refresh(self) -> None:
        delivered: dict[str, set[str]] = {name: set() for name in PATHS}
        refused: Counter[str] = Counter()
        by_path = {path: name for name, path in PATHS.items()}
        for req in self.receiver.received():
            name = by_path.get(req.path)
            if name is None:
                continue
            if 200 <= req.status < 300:
                delivered[name].add(req.headers.get("X-Idempotency-Key", ""))
            else:
                refused[name] += 1
        dead = Counter(d.destination for d in self.dead_letters.iter_entries())
        for name in PATHS:
            dead_now = dead[name] - self.dead_before[name]
            pending = max(0, self.produced[name] - len(delivered[name]) - dead_now)
            self.rows[name] = (len(delivered[name]), refused[name], dead_now, pending)

    @property
    def pending(self) -> int:
        return sum(row[3] for row in self.rows.values())

    @property
    def delivered(self) -> int:
        return sum(row[0] for row in self.rows.values())

    def table(self, title: str) -> Table:
        self.refresh()
        grid = Table(title=title)
        grid.add_column("destination")
        for column in ("produced", "delivered", "answered non-2xx", "dead-lettered", "pending"):
            grid.add_column(column, justify="right")
        for name, (delivered, refused, dead, pending) in self.rows.items():
            grid.add_row(
                name,
                str(self.produced[name]),
                str(delivered),
                str(refused),
                str(dead),
                str(pending),
            )
        return grid


def _produce_and_watch(
    producer: Producer, tally: _Tally, console: Console, duration: float, rate: float
) -> None:
    rng = random.Random()  # noqa: S311 - sample data, not security
    started = time.monotonic()
    tick = 0.25
    with Live(tally.table("starting"), console=console, refresh_per_second=4) as live:
        while (elapsed := time.monotonic() - started) < duration:
            batch = [sample_event(rng) for _ in range(max(1, round(rate * tick)))]
            for result in producer.produce_many(batch):
                for delivery_id in result.accepted:
                    tally.produced[result.destinations[delivery_id]] += 1
            live.update(tally.table(f"producing: {elapsed:.0f}s of {duration:.0f}s"))
            time.sleep(tick)
        drain_until = time.monotonic() + 30
        while time.monotonic() < drain_until:
            live.update(tally.table("draining: waiting for retries to finish"))
            if tally.pending == 0:
                break
            time.sleep(0.5)
        live.update(tally.table("done"))
    if not console.is_terminal:
        console.line()  # Live leaves its last frame without a line end when output is not a tty


def _redis_for_demo(stack: ExitStack, data_dir: Path, console: Console) -> str | None:
    external = os.environ.get("POSTBACK_RELAY_REDIS_URL") or os.environ.get("REDIS_URL")
    if external:
        if not redis_answers(external):
            console.print(f"[red]REDIS_URL={external} does not answer[/red]")
            return None
        console.print(f"Using Redis at {external}")
        return external
    # The demo's own data: start clean so nothing from an earlier run points at old ports.
    shutil.rmtree(data_dir / "redis", ignore_errors=True)
    embedded = stack.enter_context(EmbeddedRedis(data_dir / "redis"))
    console.print(
        f"Started embedded Redis (pid {embedded.process.pid if embedded.process else '?'}) "
        f"at {embedded.url} (AOF in {data_dir / 'redis'})"
    )
    return embedded.url


def run_demo(
    settings: Settings, *, duration: float, rate: float, data_dir: Path, flower: bool
) -> int:
    console = Console()
    data_dir.mkdir(parents=True, exist_ok=True)
    interrupted = False
    with ExitStack() as stack:
        redis_url = _redis_for_demo(stack, data_dir, console)
        if redis_url is None:
            return 1
        receiver = stack.enter_context(PostbackReceiver())
        receiver.responder = _FlakyPartner()
        dest_file = data_dir / "destinations.toml"
        dest_file.write_text(DESTINATIONS_TEMPLATE.read_text().replace("@BASE@", receiver.url))
        os.environ["DEMO_ANALYTICS_TOKEN"] = secrets.token_urlsafe(16)
        flower_password, flower_port = secrets.token_urlsafe(12), free_port()
        env = {
            **os.environ,
            "POSTBACK_RELAY_REDIS_URL": redis_url,
            "POSTBACK_RELAY_DESTINATIONS_FILE": str(dest_file),
            "POSTBACK_RELAY_LOG_FORMAT": "json",
            "POSTBACK_RELAY_FLOWER_USER": "demo",
            "POSTBACK_RELAY_FLOWER_PASSWORD": flower_password,
        }
        env.pop("REDIS_URL", None)
        demo_settings = settings.model_copy(
            update={"redis_url": redis_url, "destinations_file": dest_file}
        )
        client = redis_clients.client(demo_settings.state_redis)
        stack.callback(client.close)
        producer = Producer(demo_settings, load_destinations(dest_file), client)
        tally = _Tally(receiver, DeadLetterStore(client, RedisKeys(demo_settings.key_prefix)))

        procs = _Processes(data_dir, env)
        stack.callback(procs.stop_all)
        worker = procs.spawn("worker", "worker", "--queues", "templated", "--concurrency", "8")
        console.print(f"Started worker (pid {worker.pid})")
        if flower:
            flower_proc = procs.spawn("flower", "flower", "--port", str(flower_port))
            console.print(
                f"Started Flower (pid {flower_proc.pid}): http://127.0.0.1:{flower_port}  "
                f"(user demo, password {flower_password})"
            )
        console.print(f"Partner receiver: {receiver.url}; logs in {data_dir}/*.log")
        try:
            _produce_and_watch(producer, tally, console, duration, rate)
        except KeyboardInterrupt:
            interrupted = True
            console.print("Interrupted: stopping.")
        tally.refresh()
        console.print(
            f"Summary: produced {sum(tally.produced.values())} deliveries, delivered "
            f"{tally.delivered}, still pending {tally.pending}."
        )
        for name, (delivered, refused, dead, pending) in tally.rows.items():
            console.print(
                f"  {name}: delivered {delivered}, answered non-2xx {refused}, "
                f"dead-lettered {dead}, pending {pending}"
            )
    console.print("Stopped every process the demo started.")
    if interrupted:
        return 130
    return 0 if tally.delivered > 0 and tally.pending == 0 else 1
