"""The reconciler's periodic run: beat publishes one per active [[reconcile]] source, a worker of
postback.redeliver runs it under the reconciler's Redis lock (ARCHITECTURE rule 8)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from config.keys import queue_for
from config.reconcile import RECONCILE_KIND
from workers.kinds import beat_entry
from workers.kinds.redeliver.reconciler import WAITING

if TYPE_CHECKING:
    from workers.app import PostbackRelay

RECONCILE_TASK = "postback_relay.reconcile"

log = structlog.get_logger("postback_relay.reconciler")


def register(app: PostbackRelay) -> dict[str, Any]:
    """Add the reconcile task to ``app``; the beat entries that run it for each active source."""
    queue = queue_for(RECONCILE_KIND)

    @app.task(name=RECONCILE_TASK, queue=queue, shared=False)
    def reconcile(source: str) -> str:
        rec = app.destinations.reconcile[source]
        reconciler = app.runtime.reconciler
        report = reconciler.run(rec)
        if report.state in WAITING:
            # Poll again later without holding a worker: the task waits in the delay set.
            reconciler.poll_again_later(rec, report, RECONCILE_TASK, queue)
        summary = report.summary()
        log.info("reconcile.run", source=source, summary=summary)
        return summary

    return {
        f"reconcile-{rec.name}": beat_entry(RECONCILE_TASK, rec.name, rec.interval_seconds, queue)
        for rec in app.destinations.reconcile.values()
        if rec.active
    }
