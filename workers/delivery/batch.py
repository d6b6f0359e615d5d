"""One batch message's deliveries, sent at once: greenlets under gevent, threads otherwise.

Every delivery of a batch starts together (one round trip of start writes), goes out
concurrently, and is recorded as it finishes: what finished within FINISH_LINGER of the first
unrecorded finish is written in one round trip (a completion wave), so a batch costs
1 + (number of waves) round trips of bookkeeping. A fast partner answers most of a batch in one
wave; deliveries that leave one by one (a rate limit spaces them 1/limit apart) share a wave
per FINISH_LINGER instead of paying a round trip each. The task returns, and Celery acks the
message, only after every delivery is settled or parked.

All deliveries of a batch run at once (no smaller pool inside the task): a batch then takes as
long as its slowest delivery, which the timeouts bound below the soft time limit as for a
message of one (HTTP connect + read < soft limit, checked at start-up), so the task limits and
the visibility timeout derived from them hold unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import structlog

from schemas.envelope import DeliveryEnvelope
from workers.delivery.pipeline import DeliveryPipeline, PipelineResult, Started

log = structlog.get_logger("postback_relay.batch")

_T = TypeVar("_T")

# How long a finished delivery may wait for others of its batch to finish before its finish
# writes go out (one round trip for all). A request sent alone costs this machine 3x the CPU
# of one in a burst, and so does a round trip (bench/pacing_floor.py): at 50/s, a batch's
# deliveries finish 20 ms apart, and 0.2 s puts about ten in one round trip. What it risks: a
# worker killed in that time sends those deliveries again (its message comes back unacked),
# within what the batch had in flight, as any kill mid-batch.
FINISH_LINGER = 0.2
# What one delivery's call came to: its result, or what it raised.
Done = tuple[int, Any, Exception | None]


@dataclass
class BatchReport:
    """How a batch message's deliveries were left: the task's return value."""

    results: dict[str, PipelineResult] = field(default_factory=dict)  # by delivery id
    already_settled: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)  # sent on alone, each in its own message
    redis_error: redis.RedisError | None = None  # some delivery could not be recorded
    waves: int = 0  # finish round trips

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for result in self.results.values():
            counts[result.status] = counts.get(result.status, 0) + 1
        if self.already_settled:
            counts["already settled"] = len(self.already_settled)
        if self.split:
            counts["sent on alone"] = len(self.split)
        return ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))


def gevent_patched() -> bool:
    """True in a process whose standard library gevent patched (the gevent pool's worker)."""
    if "gevent" not in sys.modules:  # nothing imported gevent, so nothing patched anything
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


def completion_waves(
    calls: Sequence[Callable[[], _T]], linger: float = FINISH_LINGER
) -> Generator[list[Done]]:
    """Run every call at once; yield what has finished, as ``(index, value, exception)``, each
    time something has and ``linger`` seconds passed since (or everything is done), until all
    are done. If the consumer stops early (a soft time limit), the greenlets still running are
    killed."""
    if gevent_patched():
        yield from _greenlet_waves(calls, linger)
    else:
        yield from _thread_waves(calls, linger)


def _guarded(call: Callable[[], _T]) -> Callable[[], tuple[Any, Exception | None]]:
    def run() -> tuple[Any, Exception | None]:
        try:
            return call(), None
        except Exception as exc:  # handed to the collector: a greenlet never dies raising
            return None, exc

    return run


def _greenlet_waves(calls: Sequence[Callable[[], _T]], linger: float) -> Generator[list[Done]]:
    import gevent

    pending = {gevent.spawn(_guarded(call)): i for i, call in enumerate(calls)}
    try:
        while pending:
            gevent.wait(list(pending), count=1)
            if linger > 0:  # those still running get until then to join this wave
                try:
                    gevent.wait(list(pending), timeout=linger)
                except BaseException:  # a time limit: what finished is recorded first
                    yield [(pending.pop(g), *g.value) for g in list(pending) if g.ready()]
                    raise
            ready = [g for g in pending if g.ready()]
            yield [(pending.pop(g), *g.value) for g in ready]
    finally:
        if pending:
            gevent.killall(list(pending), block=False)


def _thread_waves(calls: Sequence[Callable[[], _T]], linger: float) -> Generator[list[Done]]:
    if len(calls) == 1:  # a message of one: no thread
        yield [(0, *_guarded(calls[0])())]
        return
    executor = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="batch")
    pending: dict[Future[tuple[Any, Exception | None]], int] = {
        executor.submit(_guarded(call)): i for i, call in enumerate(calls)
    }
    try:
        while pending:
            wait(list(pending), return_when=FIRST_COMPLETED)
            if linger > 0:
                wait(list(pending), timeout=linger)
            done = [f for f in pending if f.done()]
            yield [(pending.pop(f), *f.result()) for f in done]
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


class BatchRunner:
    """Takes one message's envelopes through the pipeline, concurrently, bookkeeping per wave."""

    def __init__(
        self,
        pipeline: DeliveryPipeline,
        on_unexpected: Callable[[DeliveryEnvelope, Exception], PipelineResult],
        split: Callable[[DeliveryEnvelope], None],
    ) -> None:
        """``on_unexpected``: keeps a delivery whose processing raised (a dead letter);
        ``split``: sends a delivery on alone, in its own message."""
        self.pipeline = pipeline
        self.on_unexpected = on_unexpected
        self.split = split

    def run(self, envelopes: Sequence[DeliveryEnvelope]) -> BatchReport:
        report = BatchReport()
        started = self.pipeline.start(envelopes, check_settled=True)
        skipped = [s for s in started if s.settled]
        report.already_settled = [s.envelope.delivery_id for s in skipped]
        if skipped:
            log.info("delivery.already_settled", deliveries=report.already_settled)
        todo = [s for s in started if not s.settled]
        if len(todo) > 1 and any(s.starts > 1 for s in todo):
            # An earlier run of this message never finished: its worker died. One delivery may
            # be what kills it; alone, each counts its own unfinished starts, and a killer
            # is dead-lettered without taking its batch-mates with it.
            for s in todo:
                self.split(s.envelope)
            report.split = [s.envelope.delivery_id for s in todo]
            self.pipeline.undo_starts([s.envelope for s in todo])
            self.pipeline.finish([(s.envelope, None) for s in skipped])
            return report
        leftover: list[tuple[DeliveryEnvelope, PipelineResult | None]] = [
            (s.envelope, None) for s in skipped
        ]
        if not todo:  # every delivery was settled by an earlier run
            self._finish(leftover, report)
            return report
        if len(todo) > 1:  # their rate-limit send times together, not a round trip each
            todo = self.pipeline.reserve_batch(todo)
        calls = [self._call(s) for s in todo]
        unfinished = dict(enumerate(todo))
        try:
            with closing(completion_waves(calls)) as waves:
                for wave in waves:
                    finished = leftover
                    leftover = []
                    for index, value, exc in wave:
                        envelope = unfinished.pop(index).envelope
                        if isinstance(exc, redis.RedisError):
                            # Not recorded, not acked: the message comes back, this one in it.
                            report.redis_error = exc
                            continue
                        result = value if exc is None else self._unexpected(envelope, exc)
                        report.results[envelope.delivery_id] = result
                        finished.append((envelope, result))
                    self._finish(finished, report)
        except redis.RedisError:
            raise
        except Exception as exc:  # the collector itself (a soft time limit): keep the rest
            finished = leftover
            for s in unfinished.values():
                result = self._unexpected(s.envelope, exc)
                report.results[s.envelope.delivery_id] = result
                finished.append((s.envelope, result))
            self._finish(finished, report)
        return report

    def _call(self, started: Started) -> Callable[[], PipelineResult]:
        def deliver() -> PipelineResult:
            structlog.contextvars.bind_contextvars(
                delivery_id=started.envelope.delivery_id,
                destination=started.envelope.destination,
                attempt=started.envelope.attempt + 1,
            )
            return self.pipeline.attempt(started)

        return deliver

    def _unexpected(self, envelope: DeliveryEnvelope, exc: Exception) -> PipelineResult:
        log.error("delivery.unexpected_error", delivery_id=envelope.delivery_id,
                  error=type(exc).__name__, exc_info=exc)  # fmt: skip
        return self.on_unexpected(envelope, exc)

    def _finish(
        self,
        finished: list[tuple[DeliveryEnvelope, PipelineResult | None]],
        report: BatchReport,
    ) -> None:
        if finished:
            self.pipeline.finish(finished)
            report.waves += 1
