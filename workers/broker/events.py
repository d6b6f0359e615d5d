"""Task events sent in batches, with any pool, so Flower costs the workers little.

Each delivery makes three task events (task-received, task-started, task-succeeded). Celery
buffers them only when the worker runs its own event loop, and even then flushes the buffer on
the loop's next turn, so nearly every event is still a publish of its own; with gevent it does
not buffer at all ("XXX This excludes eventlet/gevent, which should actually buffer",
celery/worker/consumer/events.py). That was ~18 % of a worker's CPU per delivery in the
profiles behind bench/deliver_fast.py. Here task events go out in batches with every pool:
when ``BATCH`` are waiting, or at the latest every ``FLUSH_INTERVAL`` seconds, so Flower shows a
task at most that late. Flower reads these batches as it reads Celery's own (``task.multi``).
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import bootsteps

log = structlog.get_logger("postback_relay.events")

BATCH = 64
FLUSH_INTERVAL = 0.5


class EventBatching(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        # Runs after Events.start, which builds a new dispatcher on every (re)connect.
        dispatcher = c.event_dispatcher
        if dispatcher is None or not dispatcher.enabled:
            return
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.buffer_limit = BATCH
        dispatcher.on_send_buffered = None  # the timer flushes, not every turn of the loop
        if self.tref is None:
            self.tref = c.timer.call_repeatedly(FLUSH_INTERVAL, self.flush, (c,))

    @staticmethod
    def flush(c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is None:
            return
        try:
            dispatcher.flush()
        except Exception as exc:  # the broker may be away; events are only for monitoring
            log.warning("events.flush_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    def stop(self, c: Any) -> None:
        self.flush(c)

    def shutdown(self, c: Any) -> None:
        self.flush(c)
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
