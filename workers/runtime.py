"""Per-process resources of a worker (Redis clients, HTTP session, pipeline), built after fork."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import redis
import structlog

from config.destinations import Destinations
from config.keys import RedisKeys
from config.settings import Settings
from schemas.deadletter import DeadLetter
from schemas.envelope import DeliveryEnvelope, PoisonMessage
from workers.broker.wire import TaskMessageEncoder
from workers.delivery.http import http_session
from workers.delivery.pipeline import DeliveryPipeline, PipelineResult, Requeuer
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.kinds.redeliver.reconciler import Reconciler
from workers.kinds.xmp.aggregate import XmpAggregator, XmpFlusher
from workers.logging import mask_secrets
from workers.metrics import MetricsRecorder
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger

log = structlog.get_logger("postback_relay.worker")


def redis_client(settings: Settings) -> redis.Redis:
    """A client over a pool sized to the concurrency that waits for a free connection (up to
    the socket timeout) instead of failing with MaxConnectionsError, as redis-py's bounded
    pool would, or opening connections without bound, as its default pool does."""
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_size,
        timeout=10,
        health_check_interval=30,
        socket_keepalive=True,
        socket_connect_timeout=5,
        socket_timeout=10,
        retry_on_timeout=True,
    )
    return redis.Redis(connection_pool=pool)


class WorkerRuntime:
    """Built once per worker process, lazily, so no connection crosses a fork."""

    def __init__(self, settings: Settings, destinations: Destinations, app: Any) -> None:
        self.settings = settings
        self.destinations = destinations
        self.keys = RedisKeys(settings.key_prefix)
        self._app = app
        self._lock = threading.Lock()
        self._pipeline: DeliveryPipeline | None = None
        self._xmp_flusher: XmpFlusher | None = None
        self._reconciler: Reconciler | None = None

    @property
    def pipeline(self) -> DeliveryPipeline:
        with self._lock:
            if self._pipeline is None:
                client = redis_client(self.settings)
                self._pipeline = DeliveryPipeline(
                    destinations=self.destinations,
                    session=http_session(self.settings),
                    limiter=GlobalRateLimiter(self.settings.redis_url, self.keys, client=client),
                    pauses=PauseRegistry(client, self.keys),
                    requeuer=Requeuer(
                        DelaySet(client, self.keys),
                        TaskMessageEncoder(self._app),
                        DeliveryLedger(client, self.keys, self.settings.ledger_lease_seconds),
                    ),
                    dead_letters=DeadLetterStore(client, self.keys),
                    attempts=AttemptLog(
                        client,
                        self.keys,
                        self.settings.attempt_log_max_records,
                        self.settings.attempt_log_max_age_seconds,
                    ),
                    metrics=MetricsRecorder(self.keys),
                    redis_client=client,
                    keys=self.keys,
                    max_unfinished_starts=self.settings.max_unfinished_starts,
                    aggregator=XmpAggregator(client, self.keys),
                )
            return self._pipeline

    @property
    def xmp_flusher(self) -> XmpFlusher:
        pipeline = self.pipeline
        with self._lock:
            if self._xmp_flusher is None:
                attempts = pipeline.attempts
                self._xmp_flusher = XmpFlusher(
                    pipeline.redis,
                    self.keys,
                    pipeline.session,
                    dead_letters=pipeline.dead_letters,
                    pauses=pipeline.pauses,
                    record_attempt=attempts.record_fields,
                )
            return self._xmp_flusher

    @property
    def reconciler(self) -> Reconciler:
        pipeline = self.pipeline
        with self._lock:
            if self._reconciler is None:
                self._reconciler = Reconciler(
                    pipeline.redis,
                    self.keys,
                    pipeline.session,
                    destinations=self.destinations,
                    encoder=pipeline.requeuer.encoder,
                    ledger_lease_seconds=self.settings.ledger_lease_seconds,
                )
            return self._reconciler

    def keep_unreadable_item(self, queue: str, item: bytes, reason: str) -> None:
        """A queue item kombu could not decode (it is already off the queue): keep it raw."""
        self.pipeline.dead_letters.add(DeadLetter.poison(reason, item, queue))

    def dead_letter_unexpected(
        self, raw: Any, task_id: str | None, exc: Exception
    ) -> PipelineResult:
        """Keep a delivery whose processing raised something unforeseen, replayable later."""
        try:
            envelope: DeliveryEnvelope | None = DeliveryEnvelope.from_task_arg(raw)
        except PoisonMessage:
            envelope = None
        reason = mask_secrets(
            f"unexpected error: {type(exc).__name__}: {str(exc)[:300]}",
            self.destinations.secrets_held(),
        )
        entry = DeadLetter(
            delivery_id=envelope.delivery_id if envelope else f"error-{task_id or uuid.uuid4()}",
            destination=envelope.destination if envelope else "?",
            reason=reason,
            dead_at=datetime.now(UTC),
            envelope=envelope,
            raw_message=None if envelope else repr(raw)[:4096],
        )
        self.pipeline.dead_letters.add(entry)
        if envelope is not None:  # kept in the store now; the ledger must not publish it again
            with self.pipeline.redis.pipeline() as pipe:
                self.pipeline.requeuer.ledger.settle(pipe, envelope.delivery_id)
                pipe.execute()
        return PipelineResult("dead_lettered", reason)

    def deliver(self, raw: Any, task_id: str | None) -> PipelineResult:
        """Decode, run the pipeline, map the outcome; a poison message is dead-lettered."""
        structlog.contextvars.clear_contextvars()
        pipeline = self.pipeline
        try:
            envelope = DeliveryEnvelope.from_task_arg(raw)
        except PoisonMessage as exc:
            entry = DeadLetter(
                delivery_id=f"poison-{task_id or uuid.uuid4()}",
                destination=str(raw.get("destination", "?")) if isinstance(raw, dict) else "?",
                reason=f"poison message: {exc}"[:1000],
                dead_at=datetime.now(UTC),
                raw_message=repr(raw)[:4096],
            )
            pipeline.dead_letters.add(entry)
            log.error("delivery.poison_message", alarm=True, reason=str(exc), message_id=task_id)
            return PipelineResult("dead_lettered", entry.reason)
        structlog.contextvars.bind_contextvars(
            delivery_id=envelope.delivery_id,
            destination=envelope.destination,
            attempt=envelope.attempt + 1,
        )
        return pipeline.run(envelope)
