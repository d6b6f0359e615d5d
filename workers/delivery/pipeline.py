"""The delivery pipeline: plain code that takes one envelope to delivered, later, or dead letter.

Celery tasks are thin adapters over ``DeliveryPipeline.run``; everything here can be tested
with a real Redis and a real HTTP server and no Celery at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import redis
import structlog

from config.destination_base import DestinationBase
from config.destinations import Destinations
from config.keys import RedisKeys, queue_for
from schemas.attempts import AttemptRecord
from schemas.envelope import AttemptSummary, DeliveryEnvelope
from schemas.outcomes import (
    TERMINAL_STATUSES,
    Delivered,
    DeliveryStatus,
    Outcome,
    PermanentFailure,
    Skipped,
)
from workers.delivery.effects import OutcomeEffects
from workers.delivery.pacing import Held, SendTurns, reserve_together
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.delivery.sender import Sender
from workers.kinds import DestinationAdapter, adapter_for
from workers.kinds.base import EventAggregator
from workers.logging import mask_secrets
from workers.metrics import MetricsRecorder
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore
from workers.stores.requeue import Requeuer

log = structlog.get_logger("postback_relay.pipeline")


@dataclass(frozen=True)
class PipelineResult:
    """How the pipeline left a delivery: the task's return value, for logs and Flower."""

    status: DeliveryStatus
    detail: str = ""
    attempt: AttemptRecord | None = None  # when an HTTP attempt was made
    answered_at: float | None = None  # when the attempt's answer came (the finish may be later)
    # Back on its queue at this time (epoch seconds): a retry or a deferral, written with the
    # finish writes of its completion wave (one transaction for them all).
    requeue: tuple[DeliveryEnvelope, float] | None = None


@dataclass(frozen=True)
class Started:
    """A delivery after the start writes of its message."""

    envelope: DeliveryEnvelope
    starts: int  # this start included: above 1, earlier starts never finished
    settled: bool  # the ledger no longer holds it: an earlier run of its message finished it
    paused_until: float | None  # its destination's pause, read with the start
    send_at: float | None = None  # a rate-limit send time reserved with its batch


class DeliveryPipeline:
    def __init__(
        self,
        *,
        destinations: Destinations,
        sender: Sender,
        limiter: GlobalRateLimiter,
        pauses: PauseRegistry,
        requeuer: Requeuer,
        dead_letters: DeadLetterStore,
        attempts: AttemptLog,
        metrics: MetricsRecorder,
        redis_client: redis.Redis,
        keys: RedisKeys,
        max_unfinished_starts: int = 3,
        aggregators: Iterable[EventAggregator] = (),
        clock: Callable[[], float] = time.time,
        rate_limit_max_sleep: float = 1.0,
        delay_mover_interval: float = 0.5,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.destinations = destinations
        self.limiter = limiter
        self.pauses = pauses
        self.requeuer = requeuer
        # One ledger: the requeuer parks a delivery in it, the pipeline touches and settles it.
        self.ledger = requeuer.ledger
        self.dead_letters = dead_letters
        self.attempts = attempts
        self.metrics = metrics
        self.redis = redis_client
        self.keys = keys
        self.max_unfinished_starts = max_unfinished_starts
        self.clock = clock
        self.turns = SendTurns(
            limiter, pauses, max_sleep=rate_limit_max_sleep,
            mover_interval=delay_mover_interval, clock=clock, sleep=sleep,
        )  # fmt: skip
        self.sender = sender
        self.effects = OutcomeEffects(pauses, dead_letters)
        # A kind that takes totals (XMP) counts each delivery; its periodic flush does the sending.
        self.aggregators = {aggregator.kind: aggregator for aggregator in aggregators}
        self._adapters: dict[str, DestinationAdapter] = {
            d.name: adapter_for(d) for d in destinations
        }

    def run(self, envelope: DeliveryEnvelope) -> PipelineResult:
        """Deliver, retry later or dead-letter one delivery; the start and the finish are one
        round trip each."""
        (started,) = self.start([envelope])
        result = self.attempt(started)
        self.finish([(envelope, result)])
        return result

    def start(
        self, envelopes: Sequence[DeliveryEnvelope], *, check_settled: bool = False
    ) -> list[Started]:
        """The start writes of every delivery of a message in one round trip: count the
        start, push its ledger deadline on, and read each destination's pause.
        ``check_settled``: also read whether the ledger still holds each delivery (a batch
        message run again after a crash skips those an earlier run already finished)."""
        now = self.clock()
        destinations = list(dict.fromkeys(envelope.destination for envelope in envelopes))
        with self.redis.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                started_key = self.keys.unfinished_starts(envelope.delivery_id, envelope.attempt)
                pipe.incr(started_key)
                pipe.expire(started_key, 7 * 24 * 3600)
                if check_settled:
                    pipe.zscore(self.keys.ledger(), envelope.delivery_id)
                self.ledger.touch(pipe, envelope.delivery_id, now)
            for destination in destinations:  # read here: one round trip less
                pipe.get(self.keys.paused(destination))
            replies = pipe.execute()
        now = self.clock()
        per_delivery = 4 if check_settled else 3
        paused = {
            destination: PauseRegistry.parse(value, now)
            for destination, value in zip(
                destinations, replies[per_delivery * len(envelopes) :], strict=True
            )
        }
        for destination, until in paused.items():
            self.pauses.note(destination, until)
        return [
            Started(
                envelope,
                starts=int(replies[per_delivery * i]),
                settled=check_settled and replies[per_delivery * i + 2] is None,
                paused_until=paused[envelope.destination],
            )
            for i, envelope in enumerate(envelopes)
        ]

    def attempt(self, started: Started) -> PipelineResult:
        """Everything between the start and the finish writes of one delivery."""
        if started.starts > self.max_unfinished_starts:
            # Each earlier start ended with its worker dying (or Redis vanishing) mid-task.
            return self._dead_letter(
                started.envelope,
                f"started {started.starts - 1} times without finishing: "
                "it may be killing its worker",
            )
        return self._run(started.envelope, started.paused_until, started.send_at)

    def finish(self, done: Iterable[tuple[DeliveryEnvelope, PipelineResult | None]]) -> None:
        """The finish writes of the deliveries given, in one round trip, after their retries
        and deferrals in one transaction. ``None``: nothing was done (already settled by an
        earlier run of its message): only its start is undone."""
        done = list(done)
        now = self.clock()
        self.requeuer.later_many(
            [
                (result.requeue[0], result.requeue[1] - now)
                for _, result in done
                if result is not None and result.requeue is not None
            ]
        )
        queues: set[str] = set()
        with self.redis.pipeline(transaction=False) as pipe:
            for envelope, result in done:
                pipe.delete(self.keys.unfinished_starts(envelope.delivery_id, envelope.attempt))
                queues.add(queue_for(envelope.kind))
                if result is not None:
                    self._record(pipe, envelope, result)
            self.metrics.consumed(pipe, queues, self.clock())
            pipe.execute()

    def undo_starts(self, envelopes: Iterable[DeliveryEnvelope]) -> None:
        """Uncount this start of deliveries sent on without being attempted (the count of
        earlier starts that never finished stays)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                pipe.decr(self.keys.unfinished_starts(envelope.delivery_id, envelope.attempt))
            pipe.execute()

    def _record(self, pipe: Any, envelope: DeliveryEnvelope, result: PipelineResult) -> None:
        if result.status in TERMINAL_STATUSES:
            self.ledger.settle(pipe, envelope.delivery_id)
        self.metrics.count(pipe, envelope.destination, result.status)
        if result.attempt is not None:
            self.attempts.record(pipe, result.attempt)
            self.metrics.observe(
                pipe, "http_duration", envelope.destination, result.attempt.duration_ms / 1000
            )
        if result.status == "delivered":
            done = self.clock() if result.answered_at is None else result.answered_at
            latency = done - envelope.created_at.timestamp()
            self.metrics.observe(pipe, "delivery_latency", envelope.destination, latency)

    def _run(
        self, envelope: DeliveryEnvelope, paused_until: float | None, send_at: float | None = None
    ) -> PipelineResult:
        dest = self.destinations.by_name.get(envelope.destination)
        if dest is None:
            return self._dead_letter(
                envelope, f"destination {envelope.destination!r} is not in the destinations file"
            )
        now = self.clock()
        if envelope.expired(datetime.fromtimestamp(now, UTC)):
            return self._dead_letter(envelope, "max age exceeded before delivery")
        aggregator = self.aggregators.get(dest.kind)
        if aggregator is not None:
            return self._aggregate(aggregator, dest, envelope, now)
        return self._deliver(self._adapters[dest.name], envelope, now, paused_until, send_at)

    def _deliver(
        self,
        adapter: DestinationAdapter,
        envelope: DeliveryEnvelope,
        now: float,
        paused_until: float | None,
        send_at: float | None,
    ) -> PipelineResult:
        """One HTTP attempt, unless the destination is paused or its rate limit says wait."""
        dest = adapter.destination
        if paused_until is not None:
            return self._held(self.turns.paused(envelope, paused_until - now))

        try:
            request = adapter.build_request(envelope)
        except Exception as exc:
            detail = mask_secrets(str(exc)[:300], dest.secrets_to_mask())
            return self._dead_letter(
                envelope, f"cannot build the request: {type(exc).__name__}: {detail}"
            )
        if isinstance(request, Skipped):
            log.info("delivery.skipped", reason=request.reason)
            return PipelineResult("skipped", request.reason)
        if isinstance(request, PermanentFailure):
            return self._dead_letter(envelope, request.reason)

        held = self.turns.wait(adapter, envelope, send_at)
        if held is not None:
            return self._held(held)
        now = self.clock()  # the attempt's time is when it went, after any wait for its turn
        outcome, duration = self.sender.send(adapter, request)
        self.effects.pause_if_asked(dest.name, outcome)
        budget = getattr(outcome, "budget", None)
        if budget is not None:
            self.limiter.tighten(dest.name, budget.remaining, budget.reset_at)
        summary = AttemptSummary(
            at=datetime.fromtimestamp(now, UTC),
            status=getattr(outcome, "status", None),
            outcome=type(outcome).__name__,
            error=None if isinstance(outcome, Delivered) else getattr(outcome, "reason", None),
            body_excerpt=getattr(outcome, "body_excerpt", "")[:300],
            duration_ms=round(duration * 1000, 1),
        )
        record = AttemptRecord.of(
            outcome,
            at=summary.at,
            url=request.display_url,
            method=request.method,
            destination=dest.name,
            duration_ms=summary.duration_ms,
            envelope=envelope,
        )
        result = self._settle(envelope.after_attempt(summary), outcome)
        return replace(result, attempt=record, answered_at=now + duration)

    @staticmethod
    def _held(held: Held) -> PipelineResult:
        return PipelineResult("deferred", held.detail, requeue=(held.back, held.due_at))

    def reserve_batch(self, started: Sequence[Started]) -> list[Started]:
        """``started`` with the rate-limit send times of those that will ask for one (not
        paused, not a kind that takes totals, no time held already), reserved together: one
        round trip per limit key."""
        asking = {
            i: (self._adapters[s.envelope.destination], s.envelope)
            for i, s in enumerate(started)
            if s.paused_until is None and s.envelope.destination in self._adapters
        }
        times = reserve_together(self.limiter, list(asking.values()))
        send_at = dict(zip(asking, times, strict=True))
        return [replace(s, send_at=send_at.get(i)) for i, s in enumerate(started)]

    def _aggregate(
        self,
        aggregator: EventAggregator,
        dest: DestinationBase,
        envelope: DeliveryEnvelope,
        now: float,
    ) -> PipelineResult:
        """A kind that takes totals, not events: count it; the kind's flush does the sending."""
        taken = aggregator.accept(dest, envelope, datetime.fromtimestamp(now, UTC))
        if isinstance(taken, PermanentFailure):
            return self._dead_letter(envelope, taken.reason)
        if isinstance(taken, Skipped):
            return PipelineResult("skipped", taken.reason)
        return PipelineResult("aggregated", taken.detail)

    def _settle(self, envelope: DeliveryEnvelope, outcome: Outcome) -> PipelineResult:
        """``envelope`` already counts the attempt just made."""
        if isinstance(outcome, Delivered):
            log.info("delivery.delivered", status=outcome.status)
            return PipelineResult("delivered", f"HTTP {outcome.status}")
        if isinstance(outcome, Skipped):
            return PipelineResult("skipped", outcome.reason)
        if isinstance(outcome, PermanentFailure):
            return self._dead_letter(envelope, outcome.reason, outcome.status, outcome.body_excerpt)

        dest = self.destinations.get(envelope.destination)
        if envelope.attempt >= envelope.max_attempts:
            return self._dead_letter(
                envelope,
                f"attempts exhausted ({envelope.retries_counted()}): {outcome.reason}",
                outcome.status,
                outcome.body_excerpt,
            )
        delay = dest.retry.delay_for(envelope.attempt)
        if outcome.after is not None:
            delay = max(delay, outcome.after)
        if (
            envelope.not_after is not None
            and self.clock() + delay >= envelope.not_after.timestamp()
        ):
            return self._dead_letter(
                envelope,
                f"max age would pass before the next retry: {outcome.reason}",
                outcome.status,
                outcome.body_excerpt,
            )
        log.warning("delivery.retry_scheduled", reason=outcome.reason, delay_s=round(delay, 2))
        return PipelineResult(
            "retry_scheduled",
            f"{outcome.reason}; retry in {delay:.1f}s",
            requeue=(envelope, self.clock() + delay),
        )

    def _dead_letter(
        self,
        envelope: DeliveryEnvelope,
        reason: str,
        status: int | None = None,
        body_excerpt: str = "",
    ) -> PipelineResult:
        self.effects.dead_letter_envelope(envelope, PermanentFailure(reason, status, body_excerpt))
        return PipelineResult("dead_lettered", reason)
