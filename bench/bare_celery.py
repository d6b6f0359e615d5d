"""The baseline: a minimal Celery app on the same broker whose task does nothing but count.

Started by the benchmarks as ``python -m celery -A bench.bare_celery worker ...`` (cwd = the
repository root) with the same pool, concurrency, prefetch, ``acks_late``, ``-E`` and log level
as the postback-relay workers it is compared with, so the difference between the two figures
is what postback-relay does per delivery (validation, the pipeline's Redis round trips, the
HTTP request, logging), not Celery's own cost.

With ``BENCH_RELAY_TUNING=1`` the same app runs on postback-relay's kombu transport and with its
task-event batching and timed ack writes (workers/broker/transport.py, workers/broker/events.py,
workers/broker/acks.py): a second
reference that shows how much of the difference is Celery's own per-message cost that
postback-relay trims.

``BENCH_REDIS_URL`` names the broker in a worker process; the benchmark process calls
``configure(url)`` instead (there is deliberately no default, so a stray default Redis is never
written to). The task increments ``DONE_KEY`` once per message; the benchmark polls that
counter to know when every message has been processed.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
import requests
from celery import Celery
from requests.adapters import HTTPAdapter

BROKER = os.environ.get("BENCH_REDIS_URL", "redis://bench-redis-not-configured:1/0")
QUEUE = "bench.bare"
TASK = "bench.noop"
HTTP_TASK = "bench.http_get"
STAMP_TASK = "bench.stamp"
LATENCY_KEY = "bench:bare:latency"
DONE_KEY = "bench:bare:done"

app = Celery("bench_bare", broker=BROKER, set_as_current=False)
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_heartbeat=0,
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "4")),
    worker_send_task_events=True,
    task_send_sent_event=False,
    enable_utc=True,
)

if os.environ.get("BENCH_RELAY_TUNING") == "1":
    # Not workers.app: importing it would hand Celery's logging set-up to structlog.
    from workers.broker.acks import AckWriting
    from workers.broker.events import EventBatching

    app.conf.broker_transport = "workers.broker.transport:Transport"
    app.steps["consumer"].add(EventBatching)
    app.steps["consumer"].add(AckWriting)

_client = redis.Redis.from_url(BROKER)


def configure(url: str) -> None:
    """Point the app (and the counter client) at ``url`` in the benchmark process."""
    global _client  # noqa: PLW0603 - one client per process, set before first use
    app.conf.broker_url = url
    _client = redis.Redis.from_url(url)


@app.task(name=TASK)
def noop(*_args: Any, **_kwargs: Any) -> None:
    """Do nothing but let the benchmark know this message was processed."""
    _client.incr(DONE_KEY)


_session: requests.Session | None = None
_session_lock = threading.Lock()


def _http() -> requests.Session:
    """One pooled session per process, sized like postback-relay's (workers/delivery/http.py)."""
    global _session  # noqa: PLW0603
    with _session_lock:
        if _session is None:
            _session = requests.Session()
            size = max(10, int(os.environ.get("BENCH_CONCURRENCY", "16")))
            _session.mount("http://", HTTPAdapter(pool_maxsize=size, max_retries=0))
        return _session


@app.task(name=HTTP_TASK)
def http_get(url: str, *_args: Any) -> None:
    """A reference, not the baseline: one pooled GET (what any delivery must do), then count."""
    with _http().get(url, timeout=(3.05, 10)) as response:
        response.content  # noqa: B018 - read the answer like a delivery does
    _client.incr(DONE_KEY)


@app.task(name=STAMP_TASK)
def stamp(sent_at: float, *_args: Any) -> None:
    """For latency: record how long after ``sent_at`` (epoch seconds) the task ran, then count."""
    with _client.pipeline(transaction=False) as pipe:
        pipe.rpush(LATENCY_KEY, repr(time.time() - sent_at))
        pipe.incr(DONE_KEY)
        pipe.execute()
