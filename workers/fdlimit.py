"""A worker holds a file descriptor for every socket it has open at once: one per delivery in
flight (tasks x batch size, each with its HTTP connection), its Redis pools' connections, and
a few of its own. Many hosts start processes with a soft limit of 1,024 open files, below
what gevent's 64 tasks x a batch size of 50 need; past it, every new connection fails.

At start-up the worker raises its soft limit to what it needs when the hard limit allows, and
otherwise refuses to start, naming the settings that decide the need."""

from __future__ import annotations

import resource

from config.settings import Settings

# Descriptors beyond the sockets counted: logs, the event loop, Celery's own pipes and timers.
SPARE_DESCRIPTORS = 128
# A worker's Redis pools sized by ``Settings.redis_pool_size``: kombu's channel pool, its
# asynchronous (BRPOP) pool and the worker's own client.
REDIS_POOLS = 3


def descriptors_needed(settings: Settings) -> int:
    return (
        settings.deliveries_in_flight + REDIS_POOLS * settings.redis_pool_size + SPARE_DESCRIPTORS
    )


def ensure_descriptors(settings: Settings) -> str | None:
    """Raise the soft RLIMIT_NOFILE to what ``settings`` need if the hard limit allows; a
    message saying what to change when it does not (None: enough)."""
    need = descriptors_needed(settings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return None
    return (
        f"this worker needs up to {need} open files ({settings.deliveries_in_flight} "
        f"deliveries in flight = {settings.concurrency} tasks x "
        f"POSTBACK_RELAY_BATCH_SIZE={settings.batch_size}, plus its Redis connections), "
        f"but the hard limit is {hard}: lower POSTBACK_RELAY_BATCH_SIZE or "
        "POSTBACK_RELAY_WORKER_CONCURRENCY, or raise the limit (ulimit -n, systemd "
        "LimitNOFILE, docker --ulimit nofile)"
    )
