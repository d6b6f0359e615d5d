"""kombu's Redis transport, kept alive through two failures that otherwise stop a worker.

1. A list item that is not a kombu message (bytes pushed onto a queue by hand) makes kombu raise
   after BRPOP has already removed it, and the worker exits. Here the error is logged loudly
   and the worker goes on consuming. (Such an item never comes from produce().)
2. After a lost broker connection kombu closes the channel and restores unacked messages
   through a connection it has already collected (AttributeError), and the worker exits. Here
   that restore is skipped: the messages stay in kombu's unacked hash and are restored once the
   visibility timeout passes, as after any crash.
"""

from __future__ import annotations

from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty

log = structlog.get_logger("postback_relay.transport")


class QoS(kombu_redis.QoS):
    def restore_unacked_once(self, stderr: Any = None) -> Any:
        try:
            return super().restore_unacked_once(stderr)
        except AttributeError:
            log.warning("transport.restore_skipped", reason="broker connection already gone")
            return None

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> Any:
        try:
            return super().restore_by_tag(tag, client, leftmost)
        except AttributeError:
            log.warning(
                "transport.requeue_deferred",
                tag=tag,
                reason="broker connection gone; restored after the visibility timeout",
            )
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except (ValueError, KeyError, TypeError) as exc:
            log.error("transport.unreadable_queue_item", alarm=True,
                      error=f"{type(exc).__name__}: {exc}"[:300],
                      hint="something other than postback-relay pushed onto a queue")  # fmt: skip
            raise Empty() from None


class Transport(kombu_redis.Transport):
    Channel = Channel
