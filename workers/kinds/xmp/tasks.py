"""XMP's periodic flush: beat publishes one per xmp destination, a worker of postback.xmp runs it;
the flush's Redis lock keeps two from running at once (ARCHITECTURE rule 8)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from config.keys import queue_for
from config.kinds.xmp import XmpDestination
from workers.kinds import beat_entry

if TYPE_CHECKING:
    from workers.app import PostbackRelay

XMP_FLUSH_TASK = "postback_relay.xmp_flush"

log = structlog.get_logger("postback_relay.xmp")


def register(app: PostbackRelay) -> dict[str, Any]:
    """Add the flush task to ``app``; the beat entries that run it for each xmp destination."""
    queue = queue_for("xmp")

    @app.task(name=XMP_FLUSH_TASK, queue=queue, shared=False)
    def xmp_flush(destination: str) -> str:
        dest = app.destinations.get(destination)
        assert isinstance(dest, XmpDestination)
        flusher = app.runtime.xmp_flusher
        summary = flusher.flush(dest).summary()
        log.info("xmp.flush", destination=destination, summary=summary)
        return summary

    return {
        f"xmp-flush-{dest.name}": beat_entry(
            XMP_FLUSH_TASK, dest.name, dest.flush_interval_seconds, queue
        )
        for dest in app.destinations
        if isinstance(dest, XmpDestination)
    }
