"""The arq + httpx reference: what an asyncio job queue spends per delivery on the same Redis.

Not one of postback-relay's own baselines but another Python job queue a user could pick for
the same job (issue 14 sets targets against it), measured beside postback-relay on the same
receiver and the same Redis (bench/common.py ``ArqReference`` starts it). Two roles, both on
the interpreter that has the ``bench`` dependency group (its own venv, because arq pins
redis-py < 6; bench/README.md):

- the worker, started as an operator starts arq (cwd = the repository root)::

      python -m arq bench.arq_reference.WorkerSettings

  One job = one delivery: one GET through one pooled ``httpx.AsyncClient`` per process (keep-alive,
  as many connections as jobs at once, like postback-relay's pool), the answer read. Set through
  the environment like bench/bare_celery.py: ``BENCH_REDIS_URL`` (no default, so a stray default
  Redis is never written to), ``BENCH_CONCURRENCY`` (arq's ``max_jobs``) and
  ``BENCH_ARQ_POLL_DELAY`` (seconds between queue polls); unset, arq's own defaults. Results are
  not kept (``keep_result = 0``, as Celery's ``task_ignore_result``); arq logs at INFO (its CLI's
  default), two lines per job.

- the producer, ``python bench/arq_reference.py produce <redis-url>``: a long-lived process that
  reads one JSON file path per line on stdin (a list of ``[url, event]`` argument lists), enqueues
  one job per entry and answers ``enqueued <n>``. Jobs are written the fast way: the payload from
  arq's own ``serialize_job`` and the two keys ``ArqRedis.enqueue_job`` writes (job key with its
  expiry, queue entry), 500 jobs per round trip, without enqueue_job's WATCH round trips (they
  only guard a caller-chosen job id; these are fresh uuids). So the producer is never the
  bottleneck, as with bench/bare_celery.py's messages.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from typing import Any, ClassVar

import httpx
from arq.connections import RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.worker import func

QUEUE = "bench:arq:queue"
JOB = "bench_http_get"
ENQUEUE_BATCH = 500
EXPIRES_MS = 24 * 3600 * 1000  # arq's own default job expiry (expires_extra_ms)
READY = "arq reference ready."  # bench/common.py waits for "ready." in the log, as for Celery

logger = logging.getLogger("arq.bench")


async def http_get(ctx: dict[str, Any], url: str, *_args: Any) -> None:
    """One delivery: one pooled GET, the answer read (httpx reads it before returning)."""
    client: httpx.AsyncClient = ctx["http"]
    (await client.get(url)).raise_for_status()


async def startup(ctx: dict[str, Any]) -> None:
    size = max(10, WorkerSettings.max_jobs)  # postback-relay's pool: max(10, concurrency)
    ctx["http"] = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        timeout=httpx.Timeout(10.0, connect=3.05),  # bare_celery's (connect, read)
    )
    logger.info("%s max_jobs=%d poll_delay=%gs", READY, size, WorkerSettings.poll_delay)


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].aclose()


class WorkerSettings:
    """Read by ``python -m arq bench.arq_reference.WorkerSettings``."""

    functions: ClassVar = [func(http_get, name=JOB, max_tries=1)]
    queue_name = QUEUE
    redis_settings = RedisSettings.from_dsn(
        os.environ.get("BENCH_REDIS_URL", "redis://bench-redis-not-configured:1/0")
    )
    # bench/common.py sets both (its ARQ_POLL_DELAY says why the poll is short).
    max_jobs = int(os.environ.get("BENCH_CONCURRENCY", "10"))
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.5"))
    keep_result = 0
    on_startup = startup
    on_shutdown = shutdown


def produce(redis_url: str) -> None:
    """The producer loop (see the module docstring); exits at the end of stdin."""
    import redis

    client = redis.Redis.from_url(redis_url)
    print("ready", flush=True)
    for line in sys.stdin:
        with open(line.strip()) as jobs_file:
            arg_lists: list[list[Any]] = json.load(jobs_file)
        for start in range(0, len(arg_lists), ENQUEUE_BATCH):
            with client.pipeline(transaction=False) as pipe:
                for args in arg_lists[start : start + ENQUEUE_BATCH]:
                    job_id, now_ms = uuid.uuid4().hex, int(time.time() * 1000)
                    payload = serialize_job(JOB, tuple(args), {}, None, now_ms)
                    pipe.psetex(job_key_prefix + job_id, EXPIRES_MS, payload)
                    pipe.zadd(QUEUE, {job_id: now_ms})
                pipe.execute()
        print(f"enqueued {len(arg_lists)}", flush=True)
    client.delete(QUEUE)  # an incomplete run leaves no jobs behind for the next measurement
    client.close()


if __name__ == "__main__":
    if sys.argv[1:2] != ["produce"] or len(sys.argv) != 3:
        sys.exit("usage: arq_reference.py produce <redis-url>")
    produce(sys.argv[2])
