"""The composition root of a worker process: every object it uses, built once, after fork."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast, overload

import structlog
from redis import Redis

from config.destinations import Destinations
from config.keys import RedisKeys
from config.redis import RedisSettings
from config.settings import Settings
from schemas.deadletter import DeadLetter
from schemas.envelope import DeliveryEnvelope, PoisonMessage
from workers import redis_clients
from workers.broker.wire import TaskMessageEncoder
from workers.delivery.batch import BatchReport, BatchRunner
from workers.delivery.client import http_client
from workers.delivery.http import http_session
from workers.delivery.pipeline import DeliveryPipeline, PipelineResult
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.delivery.sender import Sender
from workers.kinds.redeliver.reconciler import Reconciler
from workers.kinds.xmp.aggregate import XmpAggregator
from workers.kinds.xmp.flush import XmpFlusher
from workers.logging import mask_secrets
from workers.metrics import MetricsRecorder
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger
from workers.stores.requeue import Requeuer

log = structlog.get_logger("postback_relay.worker")

_T = TypeVar("_T")


class built_once(Generic[_T]):
    """A runtime attribute built on first use, once per process, under the runtime's lock."""

    def __init__(self, build: Callable[[WorkerRuntime], _T]) -> None:
        self.build = build

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, runtime: None, owner: type) -> built_once[_T]: ...
    @overload
    def __get__(self, runtime: WorkerRuntime, owner: type | None = None) -> _T: ...
    def __get__(
        self, runtime: WorkerRuntime | None, owner: type | None = None
    ) -> _T | built_once[_T]:
        if runtime is None:  # looked up on the class (introspection, autospec)
            return self
        with runtime._lock:
            # Kept in the instance's __dict__, where every later look-up finds it first.
            if self.name not in runtime.__dict__:
                runtime.__dict__[self.name] = self.build(runtime)
            return cast(_T, runtime.__dict__[self.name])


class WorkerRuntime:
    """The objects of one worker process, built lazily so no connection crosses a fork. Each is
    built on first use and shared: tasks and steps take what they need from here, and a path
    that needs only Redis (dead-lettering a poison message) builds no pipeline or HTTP session."""

    def __init__(self, settings: Settings, destinations: Destinations, app: Any) -> None:
        self.settings = settings
        self.destinations = destinations
        self.keys = RedisKeys(settings.key_prefix)
        self._app = app
        # Reentrant: building the pipeline builds the stores it is made of under the same lock.
        self._lock = threading.RLock()

    # The state instance, over a pool sized to the concurrency (workers/redis_clients.py).
    redis = built_once(
        lambda rt: redis_clients.client(
            rt.settings.state_redis, pool_size=rt.settings.redis_pool_size
        )
    )
    # The broker instance's client: the same one unless the state has its own instance.
    broker_redis = built_once(
        lambda rt: (
            redis_clients.client(rt.settings.broker_redis, pool_size=rt.settings.redis_pool_size)
            if rt.settings.separate_state
            else rt.redis
        )
    )
    # Deliveries and XMP's flush share one sender on urllib3's pools; the reconciler streams
    # AppMetrica's export through a requests session (workers/delivery/http.py says why).
    http = built_once(lambda rt: http_client(rt.settings))
    sender = built_once(lambda rt: Sender(rt.http))
    session = built_once(lambda rt: http_session(rt.settings))
    encoder = built_once(lambda rt: TaskMessageEncoder(rt._app))
    delays = built_once(lambda rt: DelaySet(rt.redis, rt.keys))
    dead_letters = built_once(lambda rt: DeadLetterStore(rt.redis, rt.keys))
    pauses = built_once(lambda rt: PauseRegistry(rt.redis, rt.keys))
    ledger = built_once(
        lambda rt: DeliveryLedger(rt.redis, rt.keys, rt.settings.ledger_lease_seconds)
    )
    attempts = built_once(
        lambda rt: AttemptLog(
            rt.redis,
            rt.keys,
            rt.settings.attempt_log_max_records,
            rt.settings.attempt_log_max_age_seconds,
        )
    )

    requeuer = built_once(lambda rt: Requeuer(rt.redis, rt.delays, rt.encoder, rt.ledger))

    @built_once
    def pipeline(self) -> DeliveryPipeline:
        return DeliveryPipeline(
            destinations=self.destinations,
            sender=self.sender,
            limiter=GlobalRateLimiter(self.redis, self.keys),
            pauses=self.pauses,
            requeuer=self.requeuer,
            dead_letters=self.dead_letters,
            attempts=self.attempts,
            metrics=MetricsRecorder(self.keys),
            redis_client=self.redis,
            keys=self.keys,
            max_unfinished_starts=self.settings.max_unfinished_starts,
            aggregators=[XmpAggregator(self.redis, self.keys)],
            rate_limit_max_sleep=self.settings.rate_limit_max_sleep,
            delay_mover_interval=self.settings.delay_mover_interval,
        )

    @built_once
    def batch_runner(self) -> BatchRunner:
        # A redelivered batch sends each delivery on alone (see BatchRunner.run).
        return BatchRunner(
            self.pipeline,
            on_unexpected=lambda envelope, exc: self.dead_letter_unexpected(envelope, None, exc),
            split=lambda envelope: self.requeuer.later(envelope, 0),
        )

    @built_once
    def xmp_flusher(self) -> XmpFlusher:
        return XmpFlusher(
            self.redis,
            self.keys,
            self.sender,
            dead_letters=self.dead_letters,
            pauses=self.pauses,
            attempts=self.attempts,
        )

    @built_once
    def reconciler(self) -> Reconciler:
        return Reconciler(
            self.redis,
            self.keys,
            self.session,
            destinations=self.destinations,
            encoder=self.encoder,
            delays=self.delays,
            ledger_lease_seconds=self.settings.ledger_lease_seconds,
        )

    def client_of(self, conf: RedisSettings) -> Redis:
        return redis_clients.client(conf, pool_size=self.settings.redis_pool_size)

    def keep_unreadable_item(
        self, queue: str | None, item: bytes, reason: str, message_id: str | None = None
    ) -> DeadLetter:
        """A queue item that cannot be run (it is already off the queue): keep it raw. Under the
        prefork pool the consumer calls this in the main process, which never delivers: so it
        takes Redis and the dead-letter store, never the pipeline and its HTTP session."""
        entry = DeadLetter.poison(reason, item, queue, message_id)
        self.dead_letters.add(entry)
        return entry

    def dead_letter_unexpected(
        self, raw: Any, task_id: str | None, exc: Exception
    ) -> PipelineResult:
        """Keep a delivery whose processing raised something unforeseen, replayable later.
        ``raw``: its envelope, or the task argument it came in."""
        try:
            envelope: DeliveryEnvelope | None = (
                raw if isinstance(raw, DeliveryEnvelope) else DeliveryEnvelope.from_task_arg(raw)
            )
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
        self.dead_letters.add(entry)
        if envelope is not None:  # kept in the store now; the ledger must not publish it again
            with self.redis.pipeline() as pipe:
                self.ledger.settle(pipe, envelope.delivery_id)
                pipe.execute()
        return PipelineResult("dead_lettered", reason)

    def deliver(self, raw: Any, task_id: str | None) -> PipelineResult:
        """One delivery's message (an envelope): decode, run the pipeline, map the outcome; a
        poison message is dead-lettered."""
        structlog.contextvars.clear_contextvars()
        try:
            envelope = DeliveryEnvelope.from_task_arg(raw)
        except PoisonMessage as exc:
            return self._poison(raw, f"poison-{task_id or uuid.uuid4()}", exc, task_id)
        structlog.contextvars.bind_contextvars(
            delivery_id=envelope.delivery_id,
            destination=envelope.destination,
            attempt=envelope.attempt + 1,
        )
        return self.pipeline.run(envelope)

    def deliver_batch(self, raw: list[Any], task_id: str | None) -> BatchReport:
        """A batch message (a list of envelopes): every delivery at once, each with its own
        ledger entry, attempt, outcome, retry or dead letter; a member that cannot be decoded
        is dead-lettered alone."""
        structlog.contextvars.clear_contextvars()
        prefix = f"poison-{task_id or uuid.uuid4()}"
        envelopes: list[DeliveryEnvelope] = []
        poisoned: dict[str, PipelineResult] = {}  # by the dead letter's id
        for index, item in enumerate(raw):
            try:
                envelopes.append(DeliveryEnvelope.from_task_arg(item))
            except PoisonMessage as exc:
                poison_id = f"{prefix}.{index}"
                poisoned[poison_id] = self._poison(item, poison_id, exc, task_id)
        report = self.batch_runner.run(envelopes) if envelopes else BatchReport()
        report.results.update(poisoned)
        return report

    def _poison(
        self, raw: Any, delivery_id: str, exc: PoisonMessage, task_id: str | None
    ) -> PipelineResult:
        entry = DeadLetter(
            delivery_id=delivery_id,
            destination=str(raw.get("destination", "?")) if isinstance(raw, dict) else "?",
            reason=f"poison message: {exc}"[:1000],
            dead_at=datetime.now(UTC),
            raw_message=repr(raw)[:4096],
        )
        self.dead_letters.add(entry)
        log.error("delivery.poison_message", alarm=True, reason=str(exc), message_id=task_id)
        return PipelineResult("dead_lettered", entry.reason)
