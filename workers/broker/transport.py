"""kombu's Redis transport, kept alive through two failures that otherwise stop a worker.

1. A list item that is not a kombu message (bytes pushed onto a queue by hand, JSON of another
   shape) makes kombu raise after BRPOP has already removed it. Here the item is kept whole:
   the raw bytes of each BRPOP reply are held (a redis-py response callback) until kombu has
   decoded them into a message, and an item that fails to decode goes to the
   ``on_unreadable_item`` transport option (the worker's dead-letter store) with the reason
   and its queue. Only decoding errors are caught; any other error still propagates.
   (Such an item never comes from produce().)
2. After a lost broker connection kombu closes the channel and restores unacked messages
   through a connection it has already collected (AttributeError), and the worker exits. Here
   that restore is skipped: the messages stay in kombu's unacked hash and are restored once the
   visibility timeout passes, as after any crash.

3. Every URL form of config/redis.py (redis, rediss, unix, Sentinel) runs through this same
   transport: a channel builds its pools with workers/redis_clients.py from the
   ``redis_settings`` transport option (``_connparams``, ``_get_pool``), so TLS verifies as
   every other client does, and Sentinel follows the master the sentinels name. A worker
   that lost its master looks for the promoted one every quarter second for a while
   (``Transport.establish_connection``) before Celery's slower reconnect backoff takes over.

4. An ack's Redis writes are held and written for many messages at once (``QoS``): a rate-limited
   worker acks alone every 20-60 ms, and each ack was a round trip of its own (~4.5 % of its CPU).

It also stops sooner on SIGTERM with the gevent pool (``Transport.drain_events``), and makes one
thing cheaper: kombu builds a new ``redis.Redis`` client object for every
publish, ack and unacked-index write (``conn_or_acquire``), and redis-py's client constructor
is not cheap (it builds its response-callback table each time). That was ~10 % of a worker's
CPU per delivery. A channel here builds one client over its connection pool and reuses it; a
redis-py client holds no connection of its own, so sharing it between threads is safe.

kombu internals this module relies on (kombu 5.7): ``Channel._brpop_read`` (decodes the BRPOP
reply and hands it on), ``Channel._create_client`` and the ``client`` cached property, the
``Channel.pool`` property, ``Channel._connparams`` and ``Channel._get_pool`` (a channel's
connection parameters and pool), ``Channel.connection_class``, ``Channel.sep`` (priority
suffix of a queue's key), ``QoS.restore_unacked_once`` and ``QoS.restore_by_tag``,
``virtual.QoS.ack`` (an ack's bookkeeping without kombu's Redis writes), ``QoS.reject``,
``QoS.pipe_or_acquire``, ``QoS.unacked_key``, ``QoS.unacked_index_key`` and
``QoS.visibility_timeout``, ``virtual.Channel._qos`` (a channel's QoS, if it has one),
``virtual.Transport.channels``,
``Transport.establish_connection`` (opens the first channel: retried through a Sentinel
failover); ``virtual.Message`` (raises on a payload that is not kombu's envelope) and
``Channel.from_transport_options`` are public.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis
import structlog
from celery.worker.state import maybe_shutdown
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from config.redis import RedisSettings
from schemas.errors import PostbackRelayError
from workers import redis_clients

log = structlog.get_logger("postback_relay.transport")

# How long and how often a worker on sentinel:// looks for a master again before it leaves the
# reconnecting to Celery's backoff (Transport.establish_connection).
FAILOVER_WAIT = 10.0
FAILOVER_POLL = 0.25

# Held acks are written by the ack that makes ACK_BATCH of them or finds the oldest held for
# ACK_WRITE_INTERVAL seconds, and by the worker's timer every IDLE_ACK_WRITE_INTERVAL seconds
# for the last ones before a pause (workers/broker/acks.py). Under a rate limit a worker acks
# every 20-60 ms, so 0.2 s writes ~4-10 acks per round trip; longer would save little more, and
# a held ack keeps its message in kombu's unacked hash (counted as in flight by ``health``)
# and, if the worker is killed, brings it back for a redelivery the ledger skips. The acks
# write, not the timer, while they keep coming: each tick of Celery's gevent timer cost a worker
# ~0.4 ms of CPU here (2 ms/s at 0.2 s; 0.4 ms/s at 1 s), ~2 % of a rate-limited delivery's.
# 64: a burst's worth of one gevent worker (concurrency 64).
ACK_BATCH = 64
ACK_WRITE_INTERVAL = 0.2
IDLE_ACK_WRITE_INTERVAL = 1.0

UnreadableItemHandler = Callable[[str, bytes, str], object]
"""(queue, the raw item, why it cannot be read): keeps an item kombu cannot decode."""


@dataclass(frozen=True)
class KeepUnreadable:
    """The ``on_unreadable_item`` transport option's value. Celery JSON-encodes the transport
    options in a worker's ``stats`` reply (Flower asks for it): a bare method there fails every
    such reply, so the handler says what it is instead (kombu's encoder calls ``__json__``)."""

    keep: UnreadableItemHandler
    name: str = "the dead-letter store"

    def __call__(self, queue: str, item: bytes, reason: str) -> object:
        return self.keep(queue, item, reason)

    def __json__(self) -> str:
        return self.name


class NotAKombuMessage(PostbackRelayError):
    """A queue item that decodes as JSON but is not kombu's message envelope."""


class Message(virtual.Message):
    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            # Building a message only reads the payload: any of these means its shape is wrong.
            raise NotAKombuMessage(f"{type(exc).__name__}: {exc}") from exc
        # kombu's Redis QoS files the message under these when it records it as unacked.
        info = self.delivery_info
        if not (isinstance(info, dict) and {"exchange", "routing_key"} <= info.keys()):
            raise NotAKombuMessage("properties.delivery_info lacks exchange and routing_key")

    def raw_item(self) -> bytes:
        """The message as it sits on a queue (kombu's envelope as compact JSON)."""
        return json.dumps(self.serializable(), separators=(",", ":")).encode()


class QoS(kombu_redis.QoS):
    """Acks whose Redis writes are held and written together: one ZREM from the unacked index
    and one HDEL from the unacked hash for every tag held (kombu writes both for each message
    in a round trip of its own, and a round trip done alone costs several times the CPU of one
    in a burst). kombu's bookkeeping is done at once: the message leaves ``_delivered``, so a
    closing channel never restores it, and prefetch counts it as done.

    Holding is safe because the ledger, not the ack, decides whether a delivery is sent: the
    worker records every delivery as settled in its ledger before the task returns (tasks ack
    late, after that), and a redelivered message skips the deliveries the ledger shows settled.
    An ack lost with a SIGKILLed worker costs a redelivery that sends nothing, never a second
    request to a partner. A clean stop loses none: a channel writes what it holds before it
    closes (``Channel.close``), and acks after that are written at once.

    A write that fails (Redis away) keeps its tags for the next one, but only while they are
    younger than half the visibility timeout: a redelivered message has the same tag, and an
    ack written after kombu restored its message would remove the redelivery's record. Dropped
    tags come back after the visibility timeout, as any unacked message does.

    Acks come from the pool's threads or greenlets (Celery 5.7 acks at once outside an event
    loop, ``Consumer.call_soon_ack``), writes also from the worker's timer and the consumer's
    close: the held tags are touched only under a lock, held across a write too, so a tag
    rejected meanwhile cannot be written as acked after its requeue.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held_acks: dict[Any, float] = {}  # tag -> when it was acked (monotonic)
        self._held_lock = threading.Lock()  # gevent's own once the worker has patched threading
        self._channel_closing = False

    def ack(self, delivery_tag: Any) -> None:
        virtual.QoS.ack(self, delivery_tag)  # kombu's bookkeeping, without its Redis writes
        now = time.monotonic()
        with self._held_lock:
            held = self._held_acks
            held[delivery_tag] = now
            oldest = next(iter(held.values()))  # a dict keeps the order the tags came in
            if (
                self._channel_closing
                or len(held) >= ACK_BATCH
                or now - oldest >= ACK_WRITE_INTERVAL
            ):
                self._write_held()

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        with self._held_lock:
            self._held_acks.pop(delivery_tag, None)  # rejected: never written as acked later
        super().reject(delivery_tag, requeue)

    def write_held_acks(self) -> None:
        with self._held_lock:
            self._write_held()

    def write_held_acks_before_close(self) -> None:
        """Written while the channel still has its pool (kombu's close drops it before the QoS
        restores what is unacked); acks after this are written at once."""
        with self._held_lock:
            if not self._channel_closing:
                self._channel_closing = True
                self._write_held()

    def _write_held(self) -> None:
        """Called with the lock held."""
        tags = list(self._held_acks)
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception as exc:  # a lost broker (AttributeError from a closed channel too)
            oldest = time.monotonic() - self.visibility_timeout / 2
            for tag in [tag for tag, acked in self._held_acks.items() if acked < oldest]:
                del self._held_acks[tag]
            log.warning("transport.ack_write_failed", error=f"{type(exc).__name__}: {exc}"[:300],
                        held=len(self._held_acks), dropped=len(tags) - len(self._held_acks),
                        closing=self._channel_closing)  # fmt: skip
            return
        self._held_acks.clear()

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        self.write_held_acks_before_close()  # a QoS collected without its channel's close
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
    Message = Message
    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "on_unreadable_item",
        "redis_settings",
    )
    on_unreadable_item: UnreadableItemHandler | None = None
    # The instance (config/redis.py); None: kombu's own parsing of the URL (a bare Connection).
    redis_settings: RedisSettings | None = None
    _shared_client: Any = None
    # The last BRPOP reply (queue key, raw item) until kombu has turned it into a message.
    _brpop_reply: tuple[bytes, bytes] | None = None

    def close(self) -> None:
        qos = self._qos  # None: this channel never consumed, so it holds no acks
        if isinstance(qos, QoS) and not self.closed:
            qos.write_held_acks_before_close()
        super().close()

    def write_held_acks(self) -> None:
        if isinstance(self._qos, QoS):
            self._qos.write_held_acks()

    @cached_property
    def client(self) -> Any:
        """kombu's client for BRPOP and publishing, which also keeps each BRPOP reply's raw
        bytes: once kombu fails to decode an item, BRPOP has already removed it."""
        client = self._create_client(asynchronous=True)  # type: ignore[attr-defined]
        parse = client.response_callbacks.get("BRPOP")

        def keep_reply(response: Any, **options: Any) -> Any:
            reply = parse(response, **options) if parse else response
            self._brpop_reply = tuple(reply) if reply else None
            return reply

        client.set_response_callback("BRPOP", keep_reply)
        return client

    def _connparams(self, asynchronous: bool = False) -> Any:
        """kombu's parameters (its connection subclass that takes a dropped socket out of the
        poller, its transport options) over the factory's connection class and arguments."""
        conf = self.redis_settings
        if conf is None:
            return super()._connparams(asynchronous)  # type: ignore[misc]
        # kombu subclasses this class for the poller (and picks its SSL class for broker_use_ssl).
        self.connection_class = self.connection_class_ssl = redis_clients.connection_class(conf)
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[misc]
        kombu_class = params["connection_class"]
        params |= redis_clients.connection_kwargs(conf)
        params["connection_class"] = kombu_class
        if conf.form in {"unix", "sentinel"}:
            for key in ("host", "port"):
                params.pop(key, None)
        return params

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if self.redis_settings is None:
            return super()._get_pool(asynchronous)  # type: ignore[misc]
        params = self._connparams(asynchronous)
        self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
        return redis_clients.pool(self.redis_settings, **params)

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
        self._brpop_reply = None
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except (ValueError, NotAKombuMessage) as exc:
            if self._brpop_reply is None:  # no item in hand: not a decoding error
                raise
            key, item = self._brpop_reply
            if isinstance(exc, NotAKombuMessage):
                reason = f"not a kombu message ({exc})"
            elif not _decodes(item):
                reason = f"not JSON ({type(exc).__name__}: {exc})"
            else:  # the item was decoded: the error came from whatever handled the message
                raise
            self._keep_unreadable(bytes_to_str(key).rsplit(self.sep, 1)[0], item, reason)
            raise Empty() from None
        finally:
            self._brpop_reply = None

    def _keep_unreadable(self, queue: str, item: bytes, reason: str) -> None:
        log.error("transport.unreadable_queue_item", alarm=True, queue=queue,
                  reason=reason[:300], size=len(item),
                  hint="something other than postback-relay pushed onto a queue")  # fmt: skip
        try:
            if self.on_unreadable_item is None:
                raise RuntimeError("no on_unreadable_item transport option")
            self.on_unreadable_item(queue, item, reason)
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        # Not kept: put it back at the far end of its queue rather than lose it.
        try:
            with self.conn_or_acquire() as client:
                client.lpush(queue, item)
            log.error("transport.unreadable_item_requeued", alarm=True, queue=queue, error=error)
        except Exception as push_error:
            log.critical("transport.unreadable_item_lost", alarm=True, queue=queue, error=error,
                         push_error=f"{type(push_error).__name__}: {push_error}"[:300],
                         item_base64=base64.b64encode(item).decode("ascii"))  # fmt: skip


def _decodes(item: bytes) -> bool:
    """Whether kombu's own decoding of a queue item succeeds (done again only after an error)."""
    try:
        loads(bytes_to_str(item))
    except ValueError:
        return False
    return True


class Transport(kombu_redis.Transport):
    Channel = Channel

    def write_held_acks(self) -> None:
        for channel in list(self.channels or ()):  # the consumer may open or close one meanwhile
            if isinstance(channel, Channel):
                channel.write_held_acks()

    def establish_connection(self) -> Any:
        """On sentinel://, a lost master is looked for again every quarter second for up to
        ``FAILOVER_WAIT`` s. Between a master's death and a replica's promotion the Sentinels
        name no master (or the dead one), and Celery retries a lost broker connection only
        after 2, then 4, 6... s (tests/failure/test_sentinel_failover.py: deliveries resumed
        ~4 s after the promotion that way, 0.1-0.3 s after it with this). A shutdown requested
        meanwhile is acted on at once, as between Celery's own attempts."""
        options = self.client.transport_options if self.client is not None else None
        conf = (options or {}).get("redis_settings")
        deadline = time.monotonic() + FAILOVER_WAIT
        while True:
            try:
                return super().establish_connection()
            except redis.ConnectionError as exc:  # MasterNotFoundError is one
                if conf is None or conf.form != "sentinel" or time.monotonic() >= deadline:
                    raise
                log.info("transport.waiting_for_master", error=str(exc)[:200])
                time.sleep(FAILOVER_POLL)
                maybe_shutdown()  # a SIGTERM meanwhile: stop now, as Celery's own retry would

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Celery's blocking loop (the gevent pool's) waits in here for up to 2 s of empty polls
        before it looks for a requested shutdown again; one BRPOP wait (1 s) is enough, so a
        SIGTERM is acted on within about a second instead of three."""
        if timeout is not None:
            timeout = min(timeout, self.brpop_timeout)
        super().drain_events(connection, timeout=timeout, **kwargs)
