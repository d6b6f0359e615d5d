"""Run postback-relay as deployed and check what every partner received: an operator's check.

The Procfile's processes (Flower as `web`, a worker per kind, beat, metrics) run on this host
under honcho, as the README's "Running in production" says. A real local HTTP server stands in
for each partner (the project's sandboxes): a templated partner, X's MACT API, Mobvista XMP and
AppMetrica's postbacks export, whose failed postback the reconciler redelivers to a loopback
partner. Events go in through the public API, produce() called from another process that has
only the Redis URL and the destinations file. Then `postback-relay health` and `status`,
Flower's /api/workers and the metrics endpoint are asked, honcho is stopped, and nothing the
check started may be left running. Exit 0 only when every check holds.

    .venv/bin/python scripts/as_deployed.py [--redis-url URL] [--timeout SECONDS]

Redis: --redis-url, else REDIS_URL when it answers (a key prefix of its own keeps this run's
state apart; the queues are shared, so use a database no other deployment consumes), else an
embedded redis-server started for the run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import requests

from config.keys import WORKER_KEY_PREFIXES, RedisKeys
from schemas.envelope import delivery_id_for
from workers.dev.embedded_redis import EmbeddedRedis, free_port, redis_answers
from workers.dev.receiver import PostbackReceiver
from workers.dev.server import LocalServer
from workers.kinds.redeliver.sandbox import SandboxAppMetrica, export_row
from workers.kinds.x_mact.sandbox import SandboxX, XCredentials
from workers.kinds.xmp.sandbox import SandboxXmp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: postback-relay and honcho as installed
KINDS = ("templated", "x_mact", "xmp", "redeliver")
# Every process honcho starts inherits this variable, so whatever outlives honcho can be found
# in /proc even after it left honcho's process tree.
MARKER = "POSTBACK_RELAY_AS_DEPLOYED"
STOP_GRACE = 30.0  # honcho: SIGTERM to every process, SIGKILL 5 s later; workers shut down warm

# The producing service: produce() only, from its own process with only these settings.
PRODUCER_SETTINGS = (
    "POSTBACK_RELAY_REDIS_URL",
    "POSTBACK_RELAY_STATE_REDIS_URL",  # when the state has an instance of its own
    "POSTBACK_RELAY_DESTINATIONS_FILE",
    "POSTBACK_RELAY_KEY_PREFIX",
)
PRODUCER = """
import json, sys
from producers import produce
results = [produce(event) for event in json.load(sys.stdin)]
print(json.dumps({d: r.destinations[d] for r in results for d in r.accepted}))
"""


@dataclass
class Secrets:
    """Every partner secret, fresh per run: none may show up in any output."""

    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    x: XCredentials = field(
        default_factory=lambda: XCredentials(*(secrets.token_urlsafe(12) for _ in range(4)))
    )
    x_partner_key: str = field(default_factory=lambda: base64.b64encode(os.urandom(32)).decode())
    xmp_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    appmetrica_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # our API's client

    def environ(self) -> dict[str, str]:
        return {
            "PARTNER_API_KEY": self.api_key,
            "X_CONSUMER_KEY": self.x.consumer_key,
            "X_CONSUMER_SECRET": self.x.consumer_secret,
            "X_ACCESS_TOKEN": self.x.access_token,
            "X_ACCESS_TOKEN_SECRET": self.x.access_token_secret,
            "X_PARTNER_KEY": self.x_partner_key,
            "XMP_TOKEN": self.xmp_token,
            "APPMETRICA_TOKEN": self.appmetrica_token,
            "API_TOKEN": self.api_token,
        }

    def found_in(self, text: str) -> list[str]:
        """Names of the secrets that appear in ``text`` (the consumer key is not secret)."""
        return [k for k, v in self.environ().items() if k != "X_CONSUMER_KEY" and v in text]


@dataclass
class Partners:
    templated: PostbackReceiver
    x: SandboxX
    xmp: SandboxXmp
    appmetrica: SandboxAppMetrica
    loopback: PostbackReceiver  # where the export's failed postback points
    errors: Counter[str] = field(default_factory=Counter)  # "partner: error" -> times
    resets: Counter[str] = field(default_factory=Counter)  # partner -> idle connections reset

    def __post_init__(self) -> None:
        for name in ("templated", "x", "xmp", "appmetrica", "loopback"):
            self._count_errors(name, getattr(self, name))

    def _count_errors(self, name: str, sandbox: LocalServer) -> None:
        """Count what a connection raised in a stand-in instead of printing a traceback."""

        def handle_error(_request: object, _address: object) -> None:
            error = sys.exc_info()[1]
            frames = traceback.extract_tb(sys.exc_info()[2])
            # A client may close a kept-alive connection with a reset while the server waits for
            # its next request (one whose last response it did not read to the end): no request
            # was lost, so it is counted apart.
            if isinstance(error, ConnectionResetError) and any(
                f.name == "handle_one_request" and "raw_requestline" in (f.line or "")
                for f in frames
            ):
                self.resets[name] += 1
            else:
                self.errors[f"{name}: {type(error).__name__}: {error}"] += 1

        sandbox.server.handle_error = handle_error  # type: ignore[method-assign,assignment]


def destinations_toml(p: Partners) -> str:
    """One destination of every kind and a reconcile source; secrets by environment variable.
    Short XMP flush and reconcile intervals, so that beat triggers both within the check."""
    return f"""
[[destination]]
name = "network"
kind = "templated"
url = "{p.templated.url}/pb?key={{credential:api_key}}&event=(event-name)&device=(device-id)"
credentials = {{ api_key = {{ env = "PARTNER_API_KEY" }} }}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"
events = ["af_purchase"]

[[destination]]
name = "x"
kind = "x_mact"
base_url = "{p.x.url}"
[destination.credentials]
consumer_key = {{ env = "X_CONSUMER_KEY" }}
consumer_secret = {{ env = "X_CONSUMER_SECRET" }}
access_token = {{ env = "X_ACCESS_TOKEN" }}
access_token_secret = {{ env = "X_ACCESS_TOKEN_SECRET" }}
partner_key = {{ env = "X_PARTNER_KEY" }}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"

[[destination]]
name = "xmp"
kind = "xmp"
url = "{p.xmp.url}"
flush_interval_seconds = 2
credentials = {{ xmp_token = {{ env = "XMP_TOKEN" }} }}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"

[[destination]]
name = "redeliver"
kind = "redeliver"
allow_private = true   # the loopback partner is on 127.0.0.1

[[reconcile]]
name = "appmetrica"
application_id = "1111"
token = {{ env = "APPMETRICA_TOKEN" }}
redeliver_to = "redeliver"
base_url = "{p.appmetrica.url}"
interval_seconds = 10
settle_seconds = 0
poll_seconds = 1
"""


def sample_events(run: str) -> list[dict[str, Any]]:
    """Installs and purchases that route to the templated partner, X and XMP alike."""
    now = datetime.now(UTC)
    common = {"media_source": "applovin_int", "campaign_id": "c-1", "country": "US"}
    events: list[dict[str, Any]] = []
    for n in range(3):
        ios = n % 2 == 0
        events.append({
            **common, "event_id": f"{run}-install-{n}", "event_name": "install",
            "platform": "ios" if ios else "android",
            "app_id": "id1234567890" if ios else "com.example.puzzle",
            "event_time": (now - timedelta(minutes=30 + n)).isoformat(),
            "idfa" if ios else "gaid": f"6D92078A-8246-4BA4-AE5B-{n:012d}",
        })  # fmt: skip
        events.append({
            **common, "event_id": f"{run}-purchase-{n}", "event_name": "af_purchase",
            "platform": "android", "app_id": "com.example.puzzle",
            "event_time": (now - timedelta(minutes=5 + n)).isoformat(),
            "install_time": (now - timedelta(days=1)).isoformat(),
            "gaid": f"38400000-8cf0-11bd-b23e-{n:012d}",
            "revenue": "4.99", "currency": "EUR", "revenue_usd": "5.40",
            "event_values": {"af_quantity": 1},
        })  # fmt: skip
    return events


class Report:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok))
        lines = detail.splitlines() or [""]
        print(f"  {'OK  ' if ok else 'FAIL'} {name}: {lines[0]}".rstrip(": "), flush=True)
        for line in lines[1:]:
            print(f"         {line}", flush=True)
        return ok

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.results if not ok]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "postback-relay"), *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT,
    )  # fmt: skip


def left_over(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries this run's marker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARKER}={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def status_rows(text: str) -> dict[str, list[str]]:
    """`postback-relay status` as {destination: [kind, queued, delayed, in flight, sent 1h,
    failed 1h, dead letters, paused]}."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 9 and cells[1] in KINDS:
            rows[cells[0]] = cells[1:]
    return rows


@contextmanager
def redis_for_run(url: str | None, work: Path) -> Iterator[tuple[str, str]]:
    """(the Redis URL, how it was chosen)."""
    if url is not None and not redis_answers(url, 2.0):
        raise SystemExit(f"--redis-url {url} does not answer")
    url = url or os.environ.get("REDIS_URL")
    if url and redis_answers(url, 2.0):
        yield url, "given"
        return
    with EmbeddedRedis(work / "redis") as embedded:
        yield embedded.url, "embedded redis-server, started for this run"


@contextmanager
def honcho(env: dict[str, str], work: Path, web_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The Procfile under honcho, in a session of its own; stopped as Ctrl-C would."""
    binary = BIN / "honcho" if (BIN / "honcho").exists() else shutil.which("honcho")
    if binary is None:
        raise SystemExit("honcho is not installed: pip install -e '.[test]'")
    (work / ".env").write_text("")  # not a developer's .env from the working directory
    with (work / "honcho.log").open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "--no-colour", "-e", str(work / ".env"), "-f", str(ROOT / "Procfile"),
             "start", "-p", str(web_port)],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> float:
    """Ctrl-C to honcho, as an operator stops it; seconds until it exited."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return time.monotonic() - started


def check_started(env: dict[str, str], report: Report, timeout: float) -> bool:
    started = time.monotonic()
    result: subprocess.CompletedProcess[str] | None = None

    def healthy() -> bool:
        nonlocal result
        result = cli(env, "health")
        return result.returncode == 0

    ok = wait_until(healthy, timeout, interval=1.0)
    assert result is not None
    shown = "" if ok else "\n" + (result.stdout + result.stderr).strip()
    took = time.monotonic() - started
    return report.check(
        "health after start", ok, f"exit {result.returncode} after {took:.1f}s{shown}"
    )


def produce_elsewhere(
    env: dict[str, str], events: list[dict[str, Any]], work: Path
) -> tuple[dict[str, str], str]:
    """produce() in another process with only the Redis URL and the destinations file (and the
    key prefix, if not the default): {delivery id: destination}, and what went wrong if any."""
    env = {k: v for k, v in env.items() if k in PRODUCER_SETTINGS}
    result = subprocess.run(
        [sys.executable, "-c", PRODUCER], input=json.dumps(events), env=env, cwd=work,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return {}, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"
    accepted: dict[str, str] = json.loads(result.stdout)
    return accepted, ""


API_CLIENTS = """
[[client]]
name = "backend"
token = { env = "API_TOKEN" }
"""


def ingest_over_http(
    env: dict[str, str], events: list[dict[str, Any]], timeout: float
) -> tuple[dict[str, str], str]:
    """POST the events to the Procfile's api process as a Go or Node backend would, after
    checking it refuses a request without a token: {delivery id: destination}, and what went
    wrong if any."""
    url = f"http://127.0.0.1:{env['POSTBACK_RELAY_API_PORT']}"
    if not wait_until(lambda: _get_status(f"{url}/readyz") == 200, timeout):
        return {}, f"{url}/readyz never answered 200"
    anonymous = requests.post(f"{url}/v1/events", json=events, timeout=30)
    if anonymous.status_code != 401:
        return {}, f"without a token: HTTP {anonymous.status_code}, not 401"
    answer = requests.post(f"{url}/v1/events", json=events, timeout=30,
                           headers={"Authorization": f"Bearer {env['API_TOKEN']}"})  # fmt: skip
    if answer.status_code != 202:
        return {}, f"HTTP {answer.status_code}: {answer.text[:300]}"
    accepted = {}
    for event, result in zip(events, answer.json()["results"], strict=True):
        for name in ("network", "x", "xmp"):
            if (delivery := delivery_id_for(event["event_id"], name)) in result["delivery_ids"]:
                accepted[delivery] = name
    return accepted, ""


def _get_status(url: str) -> int:
    with suppress(requests.RequestException):
        return requests.get(url, timeout=5).status_code
    return 0


def check_partners(
    p: Partners, s: Secrets, accepted: dict[str, str], reconcile_urls: tuple[str, str],
    report: Report, timeout: float,
) -> None:  # fmt: skip
    """What each stand-in received, once all has arrived (or the timeout passed)."""
    per_dest = Counter(accepted.values())

    def xmp_events() -> int:
        return sum(int(r.get("event_count", 0)) for r in p.xmp.totals.values())

    def arrived() -> bool:
        return (
            len(p.templated.received()) >= per_dest["network"]
            and len([r for r in p.x.requests if r.status == 200]) >= per_dest["x"]
            and xmp_events() >= per_dest["xmp"]
            and len(p.loopback.received()) >= 1
        )

    started = time.monotonic()
    wait_until(arrived, timeout)
    waited = time.monotonic() - started
    time.sleep(3.0)  # a duplicate or a late retry would arrive now

    want = {d for d, name in accepted.items() if name == "network"}
    got = Counter(r.headers.get("X-Idempotency-Key", "") for r in p.templated.received())
    keys = {v for r in p.templated.received() for k, v in r.query if k == "key"}
    report.check(
        "no failed connection at a stand-in",
        not p.errors,
        (", ".join(f"{error} ({n}x)" for error, n in p.errors.items()) or "none")
        + "; idle kept-alive connections reset by the client: "
        + (", ".join(f"{name} {n}" for name, n in p.resets.items()) or "none"),
    )
    report.check(
        "templated partner",
        set(got) == want and set(got.values()) == {1} and keys == {s.api_key},
        f"{sum(got.values())} requests for {len(want)} deliveries, "
        f"{sum(1 for n in got.values() if n > 1)} duplicated; credential in the URL: "
        f"{'yes' if keys == {s.api_key} else keys or 'missing'}; statuses "
        f"{dict(Counter(r.status for r in p.templated.received()))} (after {waited:.1f}s)",
    )
    x_ok = [r for r in p.x.requests if r.status == 200]
    devices = Counter(r.params.get("hashed_device_id") for r in x_ok)
    report.check(
        "X MACT sandbox",
        len(x_ok) == len(p.x.requests) == per_dest["x"] == len(devices),
        f"{len(p.x.requests)} requests, {len(x_ok)} with a valid OAuth signature (200), "
        f"{len(devices)} devices; conversion types "
        f"{dict(Counter(r.params.get('conversion_type') for r in p.x.requests))}",
    )
    report.check(
        "XMP sandbox (flush by beat)",
        bool(p.xmp.requests) and xmp_events() == per_dest["xmp"],
        f"{len(p.xmp.requests)} flush request(s), {len(p.xmp.totals)} aggregate record(s) "
        f"counting {xmp_events()} of {per_dest['xmp']} events",
    )
    never_sent, sent_later = reconcile_urls
    redelivered = [f"{p.loopback.url}{r.raw_target}" for r in p.loopback.received()]
    report.check(
        "reconcile (by beat) -> redeliver",
        redelivered == [never_sent] and sent_later not in redelivered,
        f"AppMetrica export asked {len(p.appmetrica.requests)} time(s); loopback partner got "
        f"{len(redelivered)} request(s)"
        + ("" if redelivered == [never_sent] else f": {redelivered}"),
    )


def check_operator_views(
    env: dict[str, str], accepted: dict[str, str], flower: str, metrics: str,
    report: Report, timeout: float,
) -> str:  # fmt: skip
    """health, status, Flower and metrics as on-call would see them; returns their output."""
    health = cli(env, "health")
    shown = (health.stdout + health.stderr).strip()
    report.check("health", health.returncode == 0, f"exit {health.returncode}\n{shown}")
    status = cli(env, "status")
    rows = status_rows(status.stdout)
    sent = {name: row[4] for name, row in rows.items()}
    dead = sum(int(row[6]) for row in rows.values() if row[6].isdigit())
    per_dest = Counter(accepted.values())
    report.check(
        "status",
        status.returncode == 0
        and set(rows) == {"network", "x", "xmp", "redeliver"}
        and dead == 0
        and all(sent.get(name) == str(n) for name, n in per_dest.items() if name != "xmp"),
        f"exit {status.returncode}; sent 1h {sent}; dead letters {dead}\n"
        + (status.stdout + status.stderr).strip(),
    )

    workers: dict[str, Any] = {}

    def listed() -> bool:
        nonlocal workers
        try:
            workers = requests.get(
                f"{flower}/api/workers?refresh=1", auth=(env["POSTBACK_RELAY_FLOWER_USER"],
                env["POSTBACK_RELAY_FLOWER_PASSWORD"]), timeout=10,
            ).json()  # fmt: skip
        except (requests.RequestException, ValueError):
            return False
        return sum(bool(w.get("active_queues")) for w in workers.values()) >= len(KINDS)

    wait_until(listed, timeout)
    queues = {
        name: [q["name"] for q in w.get("active_queues") or []] for name, w in workers.items()
    }
    every_queue = sorted(f"postback.{kind}" for kind in KINDS)
    anonymous = requests.get(f"{flower}/api/workers", timeout=10).status_code
    report.check(
        "Flower /api/workers",
        len(queues) == len(KINDS)
        and sorted(q for qs in queues.values() for q in qs) == every_queue
        and all(len(qs) == 1 for qs in queues.values())
        and anonymous == 401,
        f"{len(queues)} workers; without credentials: HTTP {anonymous}\n"
        + "\n".join(f"{name}: {', '.join(qs)}" for name, qs in sorted(queues.items())),
    )

    try:
        answer = requests.get(metrics, timeout=10)
        lines = [ln for ln in answer.text.splitlines() if ln.startswith("postback_relay_")]
        shown = f"HTTP {answer.status_code}, {len(lines)} postback_relay_ samples"
    except requests.RequestException as exc:
        lines, shown = [], f"no answer: {exc}"
    report.check("metrics", bool(lines), shown)
    return health.stdout + health.stderr + status.stdout + status.stderr


def check_stopped(
    proc: subprocess.Popen[bytes], marker: str, log: Path, took: float, report: Report
) -> None:
    left = left_over(marker)
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # honcho runs each line with `sh -c`: the rc it shows is the shell's, and it SIGKILLs the
    # process groups still there 5 s after its SIGTERM.
    lines = log.read_text(errors="replace").splitlines()
    ended = [ln.split(" | ", 1)[-1].strip() for ln in lines if " stopped (rc=" in ln]
    killed = [ln.split(" | ", 1)[-1].strip() for ln in lines if "sending SIGKILL" in ln]
    report.check(
        "every process stops",
        proc.returncode is not None and not left and not killed,
        f"honcho exit {proc.returncode} {took:.1f}s after SIGINT; SIGKILLed by honcho: "
        f"{len(killed)}; left running (killed now): {left or 'none'}\n" + "\n".join(ended + killed),
    )


def run(args: argparse.Namespace, work: Path, marker: str, report: Report) -> None:
    run_id = secrets.token_hex(4)
    s = Secrets()
    with ExitStack() as stack:
        redis_url, how = stack.enter_context(redis_for_run(args.redis_url, work))
        p = Partners(
            templated=stack.enter_context(PostbackReceiver()),
            x=stack.enter_context(SandboxX(s.x, attribution_share=1.0)),
            xmp=stack.enter_context(SandboxXmp(token=s.xmp_token)),
            appmetrica=stack.enter_context(SandboxAppMetrica(token=s.appmetrica_token)),
            loopback=stack.enter_context(PostbackReceiver()),
        )
        now = int(time.time())
        never_sent = f"{p.loopback.url}/pb/network?transaction_id={run_id}-1&event=install"
        sent_later = f"{p.loopback.url}/pb/network?transaction_id={run_id}-2&event=install"
        who = {"device": "6D92078A-8246-4BA4-AE5B-76104861E7DC", "application_id": "1111"}
        p.appmetrica.rows = [
            export_row(never_sent, "failed", now - 900, **who),
            export_row(sent_later, "failed", now - 800, **who),
            export_row(sent_later, "sent", now - 800, **who),
        ]
        p.appmetrica.polls_before_ready = 1  # AppMetrica prepares the export: 202 first
        dest_file = work / "destinations.toml"
        dest_file.write_text(destinations_toml(p))
        (work / "api_clients.toml").write_text(API_CLIENTS)
        web_port, metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            **s.environ(),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "POSTBACK_RELAY_REDIS_URL": redis_url,
            "POSTBACK_RELAY_DESTINATIONS_FILE": str(dest_file),
            "POSTBACK_RELAY_DATA_DIR": str(work / "data"),
            "POSTBACK_RELAY_LOG_FORMAT": "json",
            "POSTBACK_RELAY_FLOWER_USER": "ops",
            "POSTBACK_RELAY_FLOWER_PASSWORD": secrets.token_urlsafe(12),
            "POSTBACK_RELAY_METRICS_PORT": str(metrics_port),
            "POSTBACK_RELAY_API_PORT": str(free_port()),
            "POSTBACK_RELAY_API_CLIENTS_FILE": str(work / "api_clients.toml"),
            "COLUMNS": "200",  # status's table unwrapped
            MARKER: marker,
        }
        env.pop("REDIS_URL", None)
        if how == "given":
            # A key prefix of this run's own: dead letters, ledger and attempt log of others on
            # the same Redis do not count here.
            env["POSTBACK_RELAY_KEY_PREFIX"] = f"ad{run_id}"
        print(f"as deployed on {socket.gethostname()}: the Procfile under honcho; Redis "
              f"{redis_url} ({how}); work dir {work}", flush=True)  # fmt: skip
        log = work / "honcho.log"
        shown = ""
        with honcho(env, work, web_port) as proc:
            if check_started(env, report, args.timeout):
                events = sample_events(run_id)
                accepted, error = produce_elsewhere(env, events[::2], work)
                report.check(
                    "produce() from another process, no partner secret",
                    bool(accepted) and not error,
                    error or f"{len(accepted)} deliveries: {dict(Counter(accepted.values()))}",
                )
                over_http, error = ingest_over_http(env, events[1::2], args.timeout)
                report.check(
                    "POST /v1/events to the api process (401 without a token)",
                    bool(over_http) and not error,
                    error or f"{len(over_http)} deliveries: {dict(Counter(over_http.values()))}",
                )
                accepted |= over_http
                check_partners(p, s, accepted, (never_sent, sent_later), report, args.timeout)
                shown = check_operator_views(
                    env, accepted, f"http://127.0.0.1:{web_port}",
                    f"http://127.0.0.1:{metrics_port}/metrics", report, args.timeout,
                )  # fmt: skip
            took = stop(proc)
        check_stopped(proc, marker, log, took, report)
        text = log.read_text(errors="replace")
        leaked = s.found_in(text + shown)
        report.check("no secret in any output", not leaked, ", ".join(leaked) or "none found")
        errors = [ln for ln in text.splitlines()
                  if '"level": "error"' in ln or '"level": "critical"' in ln
                  or "Traceback" in ln or "Couldn't ack" in ln]  # fmt: skip
        report.check("no errors logged", not errors, f"{len(errors)} line(s)\n"
                     + "\n".join(ln[:300] for ln in errors[:5]))  # fmt: skip
        if "POSTBACK_RELAY_KEY_PREFIX" in env:  # this run's keys, on the state instance too
            for url in {redis_url, env.get("POSTBACK_RELAY_STATE_REDIS_URL") or redis_url}:
                client = redis.Redis.from_url(url)
                tag = RedisKeys(env["POSTBACK_RELAY_KEY_PREFIX"]).tag  # {prefix}: a hash tag
                for key in client.scan_iter(match=f"{tag}:*"):
                    client.delete(key)
                client.hdel(WORKER_KEY_PREFIXES, env["POSTBACK_RELAY_KEY_PREFIX"])
                client.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="default: REDIS_URL when it answers, else embedded")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds each wait may take (start, deliveries, Flower)")  # fmt: skip
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="as-deployed-"))
    marker = secrets.token_hex(8)
    report = Report()
    try:
        run(args, work, marker, report)
    finally:
        for pid in left_over(marker):  # after an error on the way: nothing may outlive the check
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if report.failed or not report.results:
            print(f"FAIL: {', '.join(report.failed) or 'nothing checked'}; logs in {work}")
            log = work / "honcho.log"
            if log.exists():
                print("--- the last lines of honcho.log ---")
                print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        else:
            print(f"PASS: {len(report.results)} checks")
            shutil.rmtree(work, ignore_errors=True)
    return 1 if report.failed or not report.results else 0


if __name__ == "__main__":
    sys.exit(main())
