"""Shared set-up for the benchmarks: Redis, destinations file, receiver, worker processes, output.

Nothing here changes the system under test: workers are started exactly as an operator would
(``python -m workers.cli.main worker ...``), each in its own process group, configured only through
``POSTBACK_RELAY_*`` environment variables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # scripts run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import redis  # noqa: E402

from config.destinations import load_destinations  # noqa: E402
from config.settings import DEFAULT_CONCURRENCY, WORKER_POOLS, Settings  # noqa: E402
from producers.produce import Producer  # noqa: E402
from workers.dev.embedded_redis import EmbeddedRedis, redis_answers  # noqa: E402

BENCH_DIR = ROOT / "bench"
CORES = os.cpu_count() or 1
POOLS = list(WORKER_POOLS)
DEFAULT_POOL: str = Settings.model_fields["worker_pool"].default
IDFA_NS = uuid.UUID("4b8a8c1e-2f7e-4a55-9d3c-0d1f6f1e2a10")
_T = TypeVar("_T")


# --- output --------------------------------------------------------------------------------


def header(title: str, **setup: Any) -> None:
    print(f"\n=== {title} ===")
    for key, value in setup.items():
        print(f"  {key.replace('_', ' ')}: {value}")
    sys.stdout.flush()


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value}" + (f"   ({note})" if note else ""), flush=True)


def verdict(target: str, met: bool | None, why: str = "") -> None:
    state = "NOT MEASURED" if met is None else ("MET" if met else "MISSED")
    print(f"  target: {target}")
    print(f"  RESULT: {state}" + (f" - {why}" if why else ""), flush=True)


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def fmt_rate(value: float, unit: str = "/s") -> str:
    return f"{value:,.0f} {unit}".replace("  ", " ")


def run_main(body: Callable[[], None]) -> None:
    """Run a benchmark: figures are printed, targets are judged, nothing asserts.

    Exit 0 whatever the figures say; exit 1 only when the harness itself broke (a worker that
    did not start, ...), with the reason printed."""
    try:
        body()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        print("  RESULT: NOT MEASURED - the benchmark harness failed (see above)", flush=True)
        sys.exit(1)


# --- Redis ---------------------------------------------------------------------------------


@dataclass
class RedisInfo:
    url: str
    source: str
    client: redis.Redis

    def describe(self) -> str:
        info = self.client.info()
        aof = self.client.config_get("appendfsync").get("appendfsync", "?")
        aof_on = self.client.config_get("appendonly").get("appendonly", "?")
        return (
            f"{self.source} redis {info.get('redis_version')} at {self.url} "
            f"(appendonly={aof_on}, appendfsync={aof})"
        )


def add_pool_args(parser: argparse.ArgumentParser) -> None:
    """--pool and --concurrency, defaulting to what ``postback-relay worker`` runs by default;
    read them back with ``pool_args``."""
    parser.add_argument("--pool", choices=POOLS, default=DEFAULT_POOL)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="per worker process (default: the pool's)"
    )


def pool_args(args: argparse.Namespace) -> tuple[str, int]:
    return args.pool, args.concurrency or DEFAULT_CONCURRENCY[args.pool]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--appendfsync",
        choices=["always", "everysec", "no"],
        default=None,
        help="set the embedded Redis' appendfsync (default: always, the production setting), "
        "to see what the disk costs",
    )
    parser.add_argument("--keep", action="store_true", help="keep the worker logs")


@contextlib.contextmanager
def redis_server(workdir: Path, appendfsync: str | None = None) -> Iterator[RedisInfo]:
    """REDIS_URL when it answers (its database is FLUSHED, as the test suite does), otherwise
    an embedded redis-server (AOF, appendfsync always: the production setting) on a free port."""
    external = os.environ.get("REDIS_URL")
    if external and redis_answers(external):
        client = redis.Redis.from_url(external)
        client.flushdb()
        yield RedisInfo(external, "external (REDIS_URL)", client)
        client.close()
        return
    with EmbeddedRedis(workdir / "redis") as server:
        client = redis.Redis.from_url(server.url)
        if appendfsync:
            client.config_set("appendfsync", appendfsync)
        yield RedisInfo(server.url, "embedded", client)
        client.close()


# --- destinations and events ---------------------------------------------------------------


def templated_toml(base_url: str, *, name: str = "bench", rate_limit: str | None = None) -> str:
    limit = f'rate_limit = "{rate_limit}"\n' if rate_limit else ""
    return f"""
[[destination]]
name = "{name}"
kind = "templated"
url = "{base_url}/pb/(app-id)?id=(event_id)&idfa=(idfa)&e=(event-name)&ts=(timestamp)"
{limit}retry = {{ max_attempts = 3, schedule = [5, 10, 20] }}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"
"""


def write_destinations(workdir: Path, text: str) -> Path:
    path = workdir / "destinations.toml"
    path.write_text(text)
    return path


def make_events(
    count: int, run_id: str, start: int = 0, app_id: str = "id1234567890"
) -> list[dict[str, Any]]:
    """Distinct installs (one delivery each with the bench destination)."""
    now = datetime.now(UTC).isoformat()
    return [
        {
            "event_id": f"{run_id}-{i}",
            "app_id": app_id,
            "platform": "ios",
            "event_name": "install",
            "event_time": now,
            "idfa": str(uuid.uuid5(IDFA_NS, str(i))).upper(),
            "media_source": "bench_network",
            "campaign": "bench",
            "country": "US",
        }
        for i in range(start, start + count)
    ]


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def make_producer(redis_url: str, destinations_file: Path, **options: Any) -> Producer:
    """``options``: more settings (``batch_size=50``)."""
    settings = Settings(redis_url=redis_url, destinations_file=destinations_file, **options)
    client = redis.Redis.from_url(redis_url, socket_keepalive=True)
    return Producer(settings, load_destinations(destinations_file), client)


def produce_all(producer: Producer, events: Sequence[dict[str, Any]], batch: int = 500) -> int:
    accepted = 0
    for start in range(0, len(events), batch):
        for result in producer.produce_many(events[start : start + batch]):
            if result.error:
                raise RuntimeError(f"bench event rejected: {result.error}")
            accepted += len(result.accepted)
    return accepted


# --- the partner endpoint ------------------------------------------------------------------


class Receiver:
    """bench/receiver.py in its own process: a fast partner endpoint that counts requests."""

    def __init__(self, workdir: Path, delay: float = 0.0, targets: bool = False) -> None:
        args = [sys.executable, str(BENCH_DIR / "receiver.py"), "--delay", str(delay)]
        if targets:
            args.append("--targets")
        self.log_path = workdir / "receiver.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("port="):
            raise RuntimeError(f"receiver did not start: {line!r} {self.log_path.read_text()}")
        self.port = int(line.split("=", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def count(self) -> int:
        return int(self._get("/__stats")["count"])

    def stats(self) -> dict[str, Any]:
        return self._get("/__stats")

    def dump(self) -> dict[str, Any]:
        return self._get("/__dump")

    def reset(self) -> None:
        self._get("/__reset")

    def set_delay(self, seconds: float) -> None:
        self._get(f"/__delay?s={seconds}")

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()


# --- worker processes ----------------------------------------------------------------------


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class WorkerProc:
    """A worker subprocess in its own process group; its output goes to a log file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT
    ) -> None:
        """``cwd``: the checkout whose code runs (``python -m`` imports from it first)."""
        self.args = args
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                start_new_session=True,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {self.proc.returncode}: {' '.join(self.args)}\n"
                + self.log()[-3000:]
            )
        return "ready." in self.log()

    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def rss_bytes(self, children: bool = True) -> int:
        """RSS of the worker process (plus its pool children, for prefork)."""
        main = self.process()
        procs = [main, *(main.children(recursive=True) if children else [])]
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def pss_bytes(self) -> int:
        """Proportional set size of the worker and its children: shared pages counted once
        in all (what a prefork pool really costs; RSS counts the forked pages per child)."""
        main = self.process()
        total = 0
        for proc in [main, *main.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_full_info().pss
        return total

    def peak_rss_bytes(self) -> int:
        """VmHWM of the main process: the kernel's own peak-RSS record."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        stop_process_group(self.proc)


def wait_ready(workers: Sequence[WorkerProc], timeout: float = 60.0) -> None:
    """Wait for every worker's "ready."; if one never gets there, stop them all (none leaks)."""
    try:
        _wait_ready(workers, timeout)
    except BaseException:
        stop_all(workers)
        raise


def _wait_ready(workers: Sequence[WorkerProc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(w.is_ready() for w in workers):
            return
        time.sleep(0.1)
    raise RuntimeError("workers not ready in time:\n" + workers[0].log()[-3000:])


def relay_env(redis_url: str, destinations_file: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "POSTBACK_RELAY_REDIS_URL": redis_url,
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(destinations_file),
        "POSTBACK_RELAY_LOG_FORMAT": "json",
        **extra,
    }


def start_relay_workers(
    count: int,
    env: dict[str, str],
    workdir: Path,
    *,
    queues: str = "templated",
    pool: str | None = None,
    concurrency: int | None = None,
    tag: str = "relay",
    cwd: Path = ROOT,
) -> list[WorkerProc]:
    """``pool``/``concurrency`` None: not on the command line (POSTBACK_RELAY_WORKER_* decide).
    ``cwd``: another checkout's code (an older commit, for a before/after in one run)."""
    options = [] if pool is None else ["--pool", pool]
    options += [] if concurrency is None else ["--concurrency", str(concurrency)]
    workers = []
    for i in range(count):
        args = [
            sys.executable, "-m", "workers.cli.main", "worker", "--queues", queues, *options,
            "--hostname", f"bench-{tag}-{i}@%h",
        ]  # fmt: skip
        workers.append(WorkerProc(args, env, workdir / f"worker-{tag}-{i}.log", cwd))
    wait_ready(workers)
    return workers


def start_bare_workers(
    count: int,
    redis_url: str,
    workdir: Path,
    *,
    pool: str = DEFAULT_POOL,
    concurrency: int = DEFAULT_CONCURRENCY[DEFAULT_POOL],
    prefetch: int = 4,
    loglevel: str = "INFO",
    tuned: bool = False,
) -> list[WorkerProc]:
    """Bare Celery workers; ``tuned``: on postback-relay's transport and event batching."""
    from bench import bare_celery

    env = {
        **os.environ,
        "BENCH_REDIS_URL": redis_url,
        "BENCH_PREFETCH_MULTIPLIER": str(prefetch),
        "BENCH_CONCURRENCY": str(concurrency),
        "BENCH_RELAY_TUNING": "1" if tuned else "0",
    }
    workers = []
    for i in range(count):
        args = [
            sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker",
            "--queues", bare_celery.QUEUE, "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", loglevel, "--without-mingle", "--without-gossip", "-E",
            "--hostname", f"bench-bare-{i}@%h",
        ]  # fmt: skip
        workers.append(WorkerProc(args, env, workdir / f"worker-bare-{i}.log"))
    wait_ready(workers)
    return workers


def worker_cpu_seconds(workers: Sequence[WorkerProc]) -> float:
    """User + system CPU of the worker processes and their pool children so far."""
    total = 0.0
    for worker in workers:
        main = worker.process()
        for proc in [main, *main.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def stop_all(workers: Sequence[WorkerProc]) -> None:
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            if worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGTERM)
    for worker in workers:
        worker.stop()


def effective_settings(env: dict[str, str]) -> Settings:
    """The settings a worker started with ``env`` sees (prefetch, mover interval, ...)."""
    keep = {k: v for k, v in env.items() if k.startswith("POSTBACK_RELAY_") or k == "REDIS_URL"}
    with _patched_environ(keep):
        return Settings()


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("POSTBACK_RELAY_")]:
            del os.environ[key]
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def log_warning_count(workers: Sequence[WorkerProc], needle: str) -> int:
    return sum(w.log().count(needle) for w in workers)


# --- the bare Celery baseline --------------------------------------------------------------


def bare_enqueue(
    client: redis.Redis, task: str, arg_lists: Sequence[tuple[Any, ...]], batch: int = 500
) -> None:
    """Publish ``task(*args)`` messages the fast way (the same wire form and the same one round
    trip per batch as produce_many), so the baseline is not held back by .delay()."""
    from bench import bare_celery
    from workers.broker.wire import TaskMessageEncoder

    encoder = TaskMessageEncoder(bare_celery.app)
    for start in range(0, len(arg_lists), batch):
        with client.pipeline(transaction=False) as pipe:
            for args in arg_lists[start : start + batch]:
                pipe.lpush(
                    bare_celery.QUEUE,
                    encoder.encode(task, bare_celery.QUEUE, args, argsrepr="(...)"),
                )
            pipe.execute()


@dataclass
class Timed:
    count: int
    seconds: float
    done: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return rate(self.count, self.seconds)


def on_schedule(items: Iterable[_T], gap: float) -> Iterator[_T]:
    """Each item when its turn comes, ``gap`` seconds apart: the i-th at start + i * gap on the
    monotonic clock, so one that comes late does not push back those after it (no drift)."""
    started = time.monotonic()
    for i, item in enumerate(items):
        time.sleep(max(0.0, started + i * gap - time.monotonic()))
        yield item


def wait_for_count(
    get: Callable[[], int], target: int, timeout: float, poll: float = 0.02
) -> tuple[bool, float, int]:
    """Poll ``get`` until it reaches ``target``; (reached, monotonic time it did, last value)."""
    deadline = time.monotonic() + timeout
    value = get()
    while value < target and time.monotonic() < deadline:
        time.sleep(poll)
        value = get()
    return value >= target, time.monotonic(), value


def measure_bare(
    info: RedisInfo,
    workdir: Path,
    count: int,
    *,
    workers: int,
    pool: str,
    concurrency: int,
    prefetch: int = 4,
    http_url: str | None = None,
    timeout: float = 120.0,
    tuned: bool = False,
) -> Timed:
    """Bare Celery pipeline: enqueue ``count`` messages -> all processed. The task is the no-op
    (the event as its argument), or with ``http_url`` one pooled GET to that URL."""
    from bench import bare_celery

    procs = start_bare_workers(
        workers,
        info.url,
        workdir,
        pool=pool,
        concurrency=concurrency,
        prefetch=prefetch,
        tuned=tuned,
    )

    def arg_lists(n: int) -> list[tuple[Any, ...]]:
        events = make_events(n, "bare-" + new_run_id())
        if http_url is None:
            return [(event,) for event in events]
        return [(f"{http_url}/bare?id={e['event_id']}", e) for e in events]

    task = bare_celery.TASK if http_url is None else bare_celery.HTTP_TASK
    done_count = lambda: int(info.client.get(bare_celery.DONE_KEY) or 0)  # noqa: E731
    try:
        warm = 2 * workers * concurrency
        info.client.set(bare_celery.DONE_KEY, 0)
        bare_enqueue(info.client, task, arg_lists(warm))
        wait_for_count(done_count, warm, 30)
        messages = arg_lists(count)
        info.client.set(bare_celery.DONE_KEY, 0)
        cpu, redis_cpu = worker_cpu_seconds(procs), redis_cpu_seconds(info.client)
        started = time.monotonic()
        bare_enqueue(info.client, task, messages)
        done, ended, got = wait_for_count(done_count, count, timeout)
        return Timed(
            got,
            ended - started,
            done,
            {
                "cpu_ms": (worker_cpu_seconds(procs) - cpu) * 1000 / max(1, got),
                "redis_cpu_ms": (redis_cpu_seconds(info.client) - redis_cpu) * 1000 / max(1, got),
            },
        )
    finally:
        stop_all(procs)
        info.client.delete(bare_celery.QUEUE)


# --- the arq + httpx reference -------------------------------------------------------------

ARQ_VENV_PYTHON = BENCH_DIR / ".venv-arq" / "bin" / "python"
ARQ_INSTALL = (
    "python3 -m venv bench/.venv-arq && bench/.venv-arq/bin/pip install 'pip>=25.1' "
    "&& bench/.venv-arq/bin/pip install --group bench"
)
ARQ_VERSIONS = (
    "import arq, httpx, redis; "
    "print(f'arq {arq.VERSION}, httpx {httpx.__version__}, redis-py {redis.__version__}')"
)
# arq sleeps poll_delay between polls of its queue (default 0.5 s). With 64 jobs of 100 ms in
# flight a worker would start at most ~64 jobs per 0.5 s; a short poll is arq tuned for rate.
ARQ_POLL_DELAY = 0.01


def add_arq_args(parser: argparse.ArgumentParser) -> None:
    """--no-arq-reference and --arq-poll-delay, for the scripts that add the arq reference row."""
    parser.add_argument(
        "--no-arq-reference", action="store_true", help="skip the arq + httpx reference"
    )
    parser.add_argument(
        "--arq-poll-delay",
        type=float,
        default=ARQ_POLL_DELAY,
        help="arq's poll_delay in seconds (arq's own default: 0.5)",
    )


@dataclass
class ArqPython:
    path: str
    versions: str

    def describe(self) -> str:
        return f"{self.versions} ({os.path.relpath(self.path, ROOT)})"


def arq_python() -> ArqPython | None:
    """The interpreter that has the ``bench`` group (arq, httpx): $BENCH_ARQ_PYTHON when set,
    otherwise bench/.venv-arq's, otherwise this one. None when it cannot import both."""
    named = os.environ.get("BENCH_ARQ_PYTHON")
    for python in [named] if named else [str(ARQ_VENV_PYTHON), sys.executable]:
        if Path(python).exists():
            check = subprocess.run(
                [python, "-c", ARQ_VERSIONS], capture_output=True, text=True, check=False
            )
            if check.returncode == 0:
                return ArqPython(python, check.stdout.strip())
    return None


def arq_missing() -> str:
    where = os.environ.get("BENCH_ARQ_PYTHON") or str(ARQ_VENV_PYTHON.relative_to(ROOT))
    return (
        f"arq + httpx reference skipped: {where} cannot import arq and httpx (the bench "
        f"dependency group). Install it: {ARQ_INSTALL}"
    )


def arq_describe() -> str:
    """One line for a results header: the arq reference's versions, or why it is skipped."""
    found = arq_python()
    return arq_missing() if found is None else found.describe()


class ArqReference:
    """bench/arq_reference.py: ``workers`` arq worker processes (``max_jobs`` = ``concurrency``
    each) and their producer process, all on ``python``, on the same Redis and receiver as the
    system under test. Measure it with the same functions as postback-relay: ``enqueue`` is its
    send-these-events callable, ``workers`` its worker processes."""

    def __init__(
        self,
        python: str,
        redis_url: str,
        workdir: Path,
        receiver_url: str,
        *,
        workers: int = 1,
        concurrency: int = DEFAULT_CONCURRENCY[DEFAULT_POOL],
        poll_delay: float = ARQ_POLL_DELAY,
    ) -> None:
        env = {
            **os.environ,
            "BENCH_REDIS_URL": redis_url,
            "BENCH_CONCURRENCY": str(concurrency),
            "BENCH_ARQ_POLL_DELAY": str(poll_delay),
        }
        self.workdir = workdir
        self.receiver_url = receiver_url
        args = [python, "-m", "arq", "bench.arq_reference.WorkerSettings"]
        self.workers = [
            WorkerProc(args, env, workdir / f"worker-arq-{i}.log") for i in range(workers)
        ]
        wait_ready(self.workers)
        self._producer_log = (workdir / "arq-producer.log").open("wb")
        self._producer = subprocess.Popen(
            [python, str(BENCH_DIR / "arq_reference.py"), "produce", redis_url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._producer_log, text=True,
            start_new_session=True,
        )  # fmt: skip
        self._sent = 0
        self._expect("ready")

    def _expect(self, prefix: str) -> None:
        assert self._producer.stdout is not None
        line = self._producer.stdout.readline()
        if not line.startswith(prefix):
            self.stop()
            log = (self.workdir / "arq-producer.log").read_text(errors="replace")
            raise RuntimeError(f"arq producer: expected {prefix!r}, got {line!r}\n{log[-3000:]}")

    def enqueue(self, events: Sequence[dict[str, Any]]) -> None:
        """One job per event, a GET to the receiver carrying its id (bare Celery's arguments),
        all in the queue when this returns."""
        assert self._producer.stdin is not None
        self._sent += 1
        path = self.workdir / f"arq-jobs-{self._sent}.json"
        url = self.receiver_url + "/arq?id="
        path.write_text(json.dumps([[url + e["event_id"], e] for e in events]))
        self._producer.stdin.write(f"{path}\n")
        self._producer.stdin.flush()
        self._expect("enqueued")

    def stop(self) -> None:
        if self._producer.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                assert self._producer.stdin is not None
                self._producer.stdin.close()
            try:
                self._producer.wait(15)
            except subprocess.TimeoutExpired:
                stop_process_group(self._producer)
        self._producer_log.close()
        stop_all(self.workers)

    def __enter__(self) -> ArqReference:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_arq_reference(
    args: argparse.Namespace,
    redis_url: str,
    workdir: Path,
    receiver_url: str,
    *,
    workers: int,
    concurrency: int,
) -> ArqReference | None:
    """The arq reference as ``add_arq_args`` asked for it; None (the reason printed) if skipped."""
    if args.no_arq_reference:
        return None
    python = arq_python()
    if python is None:
        print(f"  {arq_missing()}", flush=True)
        return None
    print(
        f"  arq reference: {python.describe()}; {workers} process(es), max_jobs {concurrency}, "
        f"poll_delay {args.arq_poll_delay:g} s",
        flush=True,
    )
    return ArqReference(
        python.path,
        redis_url,
        workdir,
        receiver_url,
        workers=workers,
        concurrency=concurrency,
        poll_delay=args.arq_poll_delay,
    )


def comparison_table(rows: Sequence[tuple[str, float, float]]) -> None:
    """(system, deliveries/s, worker CPU ms per delivery) rows, the first being postback-relay;
    each with its ratios to that first row."""
    _, relay_rate, relay_cpu = rows[0]
    print(
        f"  {'system':<58} {'deliveries/s':>12} {'worker CPU':>12} {'rate':>8} {'CPU':>8}\n"
        f"  {'':<58} {'':>12} {'/delivery':>12} {'/ relay':>8} {'/ relay':>8}"
    )
    for system, per_second, cpu_ms in rows:
        print(
            f"  {system:<58} {per_second:>10,.0f}/s {cpu_ms:>9.2f} ms "
            f"{per_second / relay_rate:>7.2f}x {cpu_ms / relay_cpu:>7.2f}x"
        )
    sys.stdout.flush()


@contextlib.contextmanager
def workspace(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="postback-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"  (logs kept in {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{CORES} cores ({model}), Python {platform.python_version()}, load average {load}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def max_in_any_window(times: Sequence[float], width: float = 1.0) -> tuple[int, float]:
    """The most timestamps in any window [t, t + width) starting at one of them, and its t."""
    ordered = sorted(times)
    best, best_at, end = 0, ordered[0] if ordered else 0.0, 0
    for start, t in enumerate(ordered):
        while end < len(ordered) and ordered[end] < t + width:
            end += 1
        if end - start > best:
            best, best_at = end - start, t
    return best, best_at
