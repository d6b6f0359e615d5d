"""XMP's flush: the records whose totals changed since their last accepted send, in batches of
<= 200, through the same sender, pause, dead-letter and attempt-record code as every kind.

One send per batch and no waiting in the task: a batch XMP could not take (down, 5xx, timeout)
stops the flush and its records stay dirty for the next one (beat runs it every
flush_interval), so a flush with XMP down ends after one request instead of running past the
task's time limit in retry sleeps. XMP dedupes by request_id, so sending a record again is safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
import structlog
from redis.exceptions import LockError

from config.keys import RedisKeys
from config.kinds.xmp import XmpDestination
from schemas.attempts import AttemptRecord
from schemas.deadletter import DeadLetter
from schemas.errors import PostbackRelayError
from schemas.outcomes import Delivered, Outcome, PermanentFailure
from workers.broker.scripts import load_script
from workers.delivery.effects import OutcomeEffects
from workers.delivery.ratelimit import PauseRegistry
from workers.delivery.sender import Sender
from workers.kinds.xmp.adapter import XmpAdapter, dumps_exact
from workers.kinds.xmp.aggregate import MAX_ACTIVE_AGE_DAYS, XmpRecord, active_date_too_old
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore

log = structlog.get_logger("postback_relay.xmp")


# Clean only if nothing was added since the send started: a late event keeps the key dirty.
@dataclass
class FlushReport:
    records: int = 0
    sent: int = 0
    requests: int = 0
    dead_lettered: dict[str, str] = field(default_factory=dict)  # request_id -> reason
    batch_ids: list[str] = field(default_factory=list)
    failed: str | None = None  # why the rest stays dirty
    left_dirty: int = 0  # records this flush stopped before settling; the next flush sends them
    skipped_locked: bool = False

    def summary(self) -> str:
        if self.skipped_locked:
            return "skipped: another flush is running"
        return (
            f"sent {self.sent} of {self.records} record(s) in {self.requests} request(s); "
            f"dead-lettered {len(self.dead_lettered)}" + (f"; {self.failed}" if self.failed else "")
        )


class _Stop(PostbackRelayError):
    """The rest of this flush waits for the next one: XMP could not take a batch now, or it
    refused us as a whole (``paused``: bad token)."""

    def __init__(self, reason: str, *, paused: bool = False) -> None:
        super().__init__(reason)
        self.paused = paused


class XmpFlusher:
    """Sends dirty records in batches of <= 200; one flush per destination at a time."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        sender: Sender,
        *,
        dead_letters: DeadLetterStore,
        pauses: PauseRegistry,
        attempts: AttemptLog | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.sender = sender
        self.pauses = pauses
        self.effects = OutcomeEffects(pauses, dead_letters)
        self.attempts = attempts
        self._mark_sent = load_script(client, "workers.kinds.xmp", "xmp_mark_sent")

    def pending(self, dest: XmpDestination, limit: int | None = None) -> list[XmpRecord]:
        ids: list[bytes] = self.redis.zrange(  # type: ignore[assignment]
            self.keys.xmp_dirty(dest.name), 0, -1 if limit is None else limit - 1
        )
        records = []
        for start in range(0, len(ids), 500):
            chunk = [i.decode() for i in ids[start : start + 500]]
            with self.redis.pipeline(transaction=False) as pipe:
                for rid in chunk:
                    pipe.hgetall(self.keys.xmp_record(dest.name, rid))
                    pipe.pfcount(self.keys.xmp_users(dest.name, rid))
                results = pipe.execute()
            for rid, raw, users in zip(chunk, results[::2], results[1::2], strict=True):
                if not raw:  # expired totals: nothing left to send
                    self.redis.zrem(self.keys.xmp_dirty(dest.name), rid)
                    continue
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                records.append(XmpRecord.from_stored(rid, fields, int(users)))
        return records

    def flush(self, dest: XmpDestination, now: datetime | None = None) -> FlushReport:
        report = FlushReport()
        lock = self.redis.lock(
            self.keys.lock(f"xmp-flush:{dest.name}"),
            timeout=max(120, dest.flush_interval_seconds * 5),
            blocking=False,
        )
        if not lock.acquire(blocking=False):
            report.skipped_locked = True
            return report
        try:
            if self.pauses.paused_until(dest.name) is not None:
                report.failed = "destination paused"
                return report
            records = self.pending(dest)
            report.records = len(records)
            fresh = self._drop_too_old(dest, records, now or datetime.now(UTC), report)
            aged = len(report.dead_lettered)
            adapter = XmpAdapter(dest)
            try:
                for start in range(0, len(fresh), dest.batch_size):
                    # Each batch renews the lock: a long flush must not let a second one start.
                    lock.reacquire()
                    self._settle(adapter, fresh[start : start + dest.batch_size], report)
            except _Stop as stop:
                report.left_dirty = len(fresh) - report.sent - (len(report.dead_lettered) - aged)
                report.failed = str(stop) if stop.paused else (
                    f"{stop}; {report.left_dirty} record(s) stay dirty for the next flush"
                )  # fmt: skip
                log.warning("xmp.flush_stopped", destination=dest.name, reason=str(stop),
                            records_left=report.left_dirty)  # fmt: skip
        except LockError:
            report.failed = "lost the flush lock; the next flush continues"
        finally:
            with contextlib.suppress(LockError):
                lock.release()
        return report

    def _drop_too_old(
        self, dest: XmpDestination, records: list[XmpRecord], now: datetime, report: FlushReport
    ) -> list[XmpRecord]:
        fresh = []
        for record in records:
            if active_date_too_old(record.dims["active_date"], dest, now):
                reason = (
                    f"active_date: {record.dims['active_date']} is older than "
                    f"{MAX_ACTIVE_AGE_DAYS} days; XMP refuses it"
                )
                self._dead_letter(dest, record, reason, report)
            else:
                fresh.append(record)
        return fresh

    def _settle(self, adapter: XmpAdapter, batch: Sequence[XmpRecord], report: FlushReport) -> None:
        """Send one batch until it is sent or its refused records stand alone, dead-lettered;
        raises _Stop when the rest of the flush must wait."""
        outcome = self._send(adapter, batch, report)
        if isinstance(outcome, Delivered):
            self._sent(adapter.destination, batch, report, adapter.batch_id(outcome))
            return
        if not isinstance(outcome, PermanentFailure):
            raise _Stop(outcome.reason)
        if outcome.pause_seconds:
            raise _Stop(f"{outcome.reason}: destination paused", paused=True)
        if len(batch) == 1:
            self._dead_letter(adapter.destination, batch[0], outcome.reason, report)
            return
        middle = len(batch) // 2  # bisect until the refused records stand alone
        for half in (batch[:middle], batch[middle:]):
            self._settle(adapter, half, report)

    def _send(
        self, adapter: XmpAdapter, batch: Sequence[XmpRecord], report: FlushReport
    ) -> Outcome:
        """One request, its pause and alarms if XMP asks, and its attempt record."""
        dest = adapter.destination
        request = adapter.build_flush(batch)
        report.requests += 1
        at = datetime.now(UTC)
        outcome, seconds = self.sender.send(adapter, request)
        self.effects.pause_if_asked(dest.name, outcome)
        if self.attempts is not None:
            self.attempts.add(
                AttemptRecord.of(
                    outcome,
                    at=at,
                    url=request.display_url,
                    method=request.method,
                    destination=dest.name,
                    duration_ms=round(seconds * 1000, 1),
                    records=len(batch),
                    batch_id=adapter.batch_id(outcome),
                )
            )
        return outcome

    def _sent(
        self, dest: XmpDestination, batch: Sequence[XmpRecord], report: FlushReport,
        batch_id: str | None,
    ) -> None:  # fmt: skip
        keys = [self.keys.xmp_dirty(dest.name)]
        args: list[str] = []
        for record in batch:
            keys.append(self.keys.xmp_record(dest.name, record.request_id))
            args += [record.request_id, record.version]
        self._mark_sent(keys=keys, args=args)
        report.sent += len(batch)
        if batch_id:
            report.batch_ids.append(batch_id)

    def _dead_letter(
        self, dest: XmpDestination, record: XmpRecord, reason: str, report: FlushReport
    ) -> None:
        self.effects.dead_letter(
            DeadLetter(
                delivery_id=f"xmp-{dest.name}-{record.request_id}"[:200],
                destination=dest.name,
                reason=reason[:1000],
                dead_at=datetime.now(UTC),
                raw_message=dumps_exact(record.payload(dest)).decode()[:4096],
            )
        )
        self.redis.zrem(self.keys.xmp_dirty(dest.name), record.request_id)
        report.dead_lettered[record.request_id] = reason
