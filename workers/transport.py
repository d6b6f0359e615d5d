"""kombu's Redis transport, kept alive through two failures that otherwise stop a worker.

1. A list item that is not a kombu message (bytes pushed onto a queue by hand) makes kombu raise
   after BRPOP has already removed it, and the worker exits. Here the error is logged loudly
   and the worker goes on consuming. (Such an item never comes from produce().)
2. After a lost broker connection kombu closes the channel and restores unacked messages
   through a connection it has already collected (AttributeError), and the worker exits. Here
   that restore is skipped: the messages stay in kombu's unacked hash and are restored once the
   visibility timeout passes, as after any crash.

It also stops sooner on SIGTERM with the gevent pool (``Transport.drain_events``), and makes one
thing cheaper: kombu builds a new ``redis.Redis`` client object for every
publish, ack and unacked-index write (``conn_or_acquire``), and redis-py's client constructor
is not cheap (it builds its response-callback table each time). That was ~10 % of a worker's
CPU per delivery. A channel here builds one client over its connection pool and reuses it; a
redis-py client holds no connection of its own, so sharing it between threads is safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            # A new pool (after a reconnect) gets a new client; the old one goes with it.
            shared = self._shared_client = self._create_client()  # type: ignore[attr-defined]
        yield shared

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

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Celery's blocking loop (the gevent pool's) waits in here for up to 2 s of empty polls
        before it looks for a requested shutdown again; one BRPOP wait (1 s) is enough, so a
        SIGTERM is acted on within about a second instead of three."""
        if timeout is not None:
            timeout = min(timeout, self.brpop_timeout)
        super().drain_events(connection, timeout=timeout, **kwargs)
