"""`postback-relay demo`: the whole system on one machine with nothing installed but this package.

Starts (unless REDIS_URL is set) a real redis-server with AOF on; in this process, stand-ins for
every destination kind (a receiver for three templated partners, the X, XMP and AppMetrica
sandboxes, see demo_partners); a worker on every queue, beat (XMP's flush), the metrics
endpoint and Flower. It produces sample events, runs the reconciler once, shows deliveries live,
prints a summary per kind, and stops every process it started.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.live import Live

from config.destinations import load_destinations
from config.keys import RedisKeys
from config.settings import Settings
from producers.produce import Producer
from workers import redis_clients
from workers.dev.demo_partners import FORCED_FAILURES, Partners
from workers.dev.demo_report import ReconcileRun, Tally, dlq_commands
from workers.dev.embedded_redis import EmbeddedRedis, free_port, redis_answers

_EVENTS = ["install", "install", "af_purchase", "af_level_achieved", "af_tutorial_completion"]
# AppsFlyer media sources that XMP's channel map knows (an unknown one is refused by XMP's kind)
_SOURCES = ["applovin_int", "unityads_int", "mintegral_int", "ironsource_int", "tiktokglobal_int"]
DRAIN_SECONDS = 30.0


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
        "country": rng.choice(["US", "DE", "BR"]),
        "ip": f"203.0.113.{rng.randint(1, 254)}",
        "media_source": rng.choice(_SOURCES),
        "campaign": "winter_sale",
        "campaign_id": rng.choice(["1001", "1002"]),  # few: XMP's daily records add up
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
        f"at {embedded.url} (AOF in {_shown(data_dir / 'redis')})"
    )
    return embedded.url


class _Run:
    """One demo run: its processes, its partners, its figures."""

    def __init__(
        self, console: Console, procs: _Processes, partners: Partners, tally: Tally
    ) -> None:
        self.console = console
        self.procs = procs
        self.partners = partners
        self.tally = tally
        self.reconciler: subprocess.Popen[bytes] | None = None
        self.pids: dict[str, int] = {}

    def spawn(self, name: str, *args: str) -> int:
        pid = self.procs.spawn(name, *args).pid
        self.pids[name] = pid
        return pid

    def watch_reconcile(self, elapsed: float, duration: float) -> None:
        """Start the one reconcile run a third of the way in; read its table when it ends."""
        run = self.tally.reconcile
        if self.reconciler is None and elapsed >= duration / 3:
            self.reconciler = self.procs.spawn("reconcile", "reconcile", "--source", "appmetrica")
            self.pids["reconcile"] = self.reconciler.pid
            run.started_at = elapsed
        elif self.reconciler is not None and run.exit_code is None:
            code = self.reconciler.poll()
            if code is not None:
                run.exit_code = code
                log = self.procs.log_dir / "reconcile.log"
                run.counts = ReconcileRun.parse(log.read_text(errors="replace"))

    def start_processes(self, flower: bool, env: dict[str, str]) -> str:
        """The worker (every queue), beat, the metrics endpoint and Flower; the metrics URL."""
        console = self.console
        pid = self.spawn("worker", "worker", "--concurrency", "8")
        console.print(f"Started worker (pid {pid}) on every kind's queue")
        pid = self.spawn("beat", "beat")
        console.print(f"Started beat (pid {pid}): XMP's flush every 2s")
        port = free_port()
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        pid = self.spawn("metrics", "metrics", "--port", str(port), "--address", "127.0.0.1")
        console.print(f"Started metrics (pid {pid}): {metrics_url}", soft_wrap=True)
        if flower:
            port = free_port()
            pid = self.spawn("flower", "flower", "--port", str(port))
            console.print(f"Started Flower (pid {pid}): http://127.0.0.1:{port}")
            password = env["POSTBACK_RELAY_FLOWER_PASSWORD"]
            console.print(f"  user demo, password {password}", highlight=False)
        return metrics_url

    @property
    def settled(self) -> bool:
        return self.tally.pending == 0 and self.tally.reconcile.exit_code is not None

    def produce_and_watch(self, producer: Producer, duration: float, rate: float) -> None:
        rng = random.Random()  # noqa: S311 - sample data, not security
        started = time.monotonic()
        tick = 0.25
        with Live(self.tally.live("starting"), console=self.console, refresh_per_second=4) as live:
            while (elapsed := time.monotonic() - started) < duration:
                batch = [sample_event(rng) for _ in range(max(1, round(rate * tick)))]
                for event, result in zip(batch, producer.produce_many(batch), strict=True):
                    for delivery_id in result.accepted:
                        destination = result.destinations[delivery_id]
                        self.tally.produced[destination] += 1
                        if destination == "x":
                            self.partners.expect_x_device(event.get("idfa") or event["gaid"])
                self.watch_reconcile(elapsed, duration)
                live.update(self.tally.live(f"producing: {elapsed:.0f}s of {duration:.0f}s"))
                time.sleep(tick)
            drain_until = time.monotonic() + DRAIN_SECONDS
            while time.monotonic() < drain_until:
                self.watch_reconcile(duration, duration)
                live.update(self.tally.live("draining: retries, XMP's next flush"))
                if self.settled:
                    break
                time.sleep(0.5)
            live.update(self.tally.live("done"))
        if not self.console.is_terminal:
            self.console.line()  # Live leaves its last frame without a line end in a pipe


def _scrape(url: str) -> int:
    """How many postback_relay samples the metrics endpoint serves (0 when it does not answer)."""
    try:
        text = requests.get(url, timeout=5).text
    except requests.RequestException:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith("postback_relay_"))


def _shown(path: Path) -> str:
    """A path as short as it can be shown: relative when it is under the current directory."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _cli_name() -> str:
    invoked = Path(sys.argv[0])
    if invoked.name != "postback-relay" or shutil.which("postback-relay") == str(invoked):
        return "postback-relay"
    return _shown(invoked)


def _print_summary(
    console: Console, tally: Tally, redis_url: str, dest_file: Path, keep_running: bool
) -> None:
    console.print(tally.summary_table())
    dead = sum(row["dead_lettered"] for row in tally.rows.values())
    console.print(
        f"Summary: produced {sum(tally.produced.values())} deliveries, "
        f"{dead} dead-lettered, still pending {tally.pending}.",
        highlight=False,
    )
    if dead:
        when = (
            "try these in another terminal while the demo runs:"
            if keep_running
            else "run the demo with --keep-running to try these while its Redis is up:"
        )
        console.print(f"network-events refused {FORCED_FAILURES} deliveries with 400; {when}",
                      highlight=False)  # fmt: skip
        for command in dlq_commands(_cli_name(), redis_url, _shown(dest_file)):
            console.print(f"  {command}", soft_wrap=True, highlight=False)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _child_env(
    credentials: dict[str, str], redis_url: str, dest_file: Path, data_dir: Path
) -> dict[str, str]:
    env = {
        **os.environ,
        **credentials,
        "POSTBACK_RELAY_REDIS_URL": redis_url,
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(dest_file),
        "POSTBACK_RELAY_DATA_DIR": str(data_dir),  # beat's schedule file
        "POSTBACK_RELAY_LOG_FORMAT": "json",
        "POSTBACK_RELAY_FLOWER_USER": "demo",
        "POSTBACK_RELAY_FLOWER_PASSWORD": secrets.token_urlsafe(12),
    }
    env.pop("REDIS_URL", None)
    return env


def run_demo(
    settings: Settings,
    *,
    duration: float,
    rate: float,
    data_dir: Path,
    flower: bool,
    keep_running: bool = False,
    summary_json: Path | None = None,
) -> int:
    console = Console()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob("celerybeat-schedule*"):  # beat's last runs, from an earlier demo
        old.unlink()
    interrupted = False
    with ExitStack() as stack:
        # `kill` stops the demo as Ctrl-C does: every process it started is stopped too.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        stack.callback(signal.signal, signal.SIGTERM, previous)
        redis_url = _redis_for_demo(stack, data_dir, console)
        if redis_url is None:
            return 1
        partners = Partners.start(stack)
        dest_file = data_dir / "destinations.toml"
        dest_file.write_text(partners.destinations_toml())
        env = _child_env(partners.env, redis_url, dest_file, data_dir)
        demo_settings = settings.model_copy(
            update={"redis_url": redis_url, "destinations_file": dest_file}
        )
        client = redis_clients.client(demo_settings.state_redis)
        stack.callback(client.close)
        destinations = load_destinations(dest_file)
        producer = Producer(demo_settings, destinations, client)
        tally = Tally(partners, destinations, client, RedisKeys(demo_settings.key_prefix))

        procs = _Processes(data_dir, env)
        stack.callback(procs.stop_all)
        run = _Run(console, procs, partners, tally)
        metrics_url = run.start_processes(flower, env)
        console.print(f"Partners in this process; logs in {_shown(data_dir)}/*.log")
        try:
            run.produce_and_watch(producer, duration, rate)
        except KeyboardInterrupt:
            interrupted = True
            console.print("Interrupted: stopping.")
        samples = _scrape(metrics_url)
        _print_summary(console, tally, redis_url, dest_file, keep_running)
        partners.write_request_logs(data_dir)
        if summary_json is not None:
            summary_json.write_text(json.dumps(tally.as_json({
                "duration": duration, "redis_url": redis_url, "metrics_url": metrics_url,
                "metrics_samples": samples, "processes": run.pids,
                "data_dir": str(data_dir), "interrupted": interrupted,
            }), indent=2))  # fmt: skip
        if keep_running and not interrupted:
            console.print("Still running: press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                console.print("Stopping.")
            partners.write_request_logs(data_dir)  # with what `dlq replay` sent meanwhile
    console.print("Stopped every process the demo started.")
    if interrupted:
        return 130
    ok = run.settled and tally.reconcile.exit_code == 0
    return 0 if ok and sum(tally.produced.values()) > 0 else 1
