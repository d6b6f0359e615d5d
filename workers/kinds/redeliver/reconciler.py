"""The reconciler: read AppMetrica's postbacks export, find postbacks that never got through,
and redeliver each of them once, ever, through the normal pipeline (kind `redeliver`).

The export has one row per attempt, so a postback that failed and later succeeded has both
rows: rows are grouped by postback identity and only groups with no `sent` row are redelivered.
Rows are streamed (ijson), so an export of any size is read in constant memory per postback.
Each run covers from the last checkpoint minus an overlap to now minus a settle delay; a
claim key per postback (kept longer than the look-back) makes every redelivery happen once,
however runs overlap and however many reconcilers run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import ijson
import redis
import requests
import structlog
import urllib3
from pydantic import ValidationError
from redis.exceptions import LockError

from config.destinations import Destinations
from config.keys import RedisKeys, queue_for
from config.reconcile import ReconcileSource
from schemas.appmetrica import EXPORT_FIELDS, TIME_FORMAT, ExportRow
from schemas.envelope import DeliveryEnvelope, Redelivery, delivery_id_for
from schemas.errors import describe_validation_error
from workers.broker.publish import Enqueue, EnqueueOnce
from workers.broker.wire import TaskMessageEncoder
from workers.delivery.http import retry_after_seconds
from workers.metrics import MetricsRecorder
from workers.stores.delay import DelaySet

log = structlog.get_logger("postback_relay.reconciler")

# AppMetrica has not answered with the export yet: ask again, with the identical request.
WAITING = frozenset({"pending", "rate_limited"})


@dataclass
class RunReport:
    source: str
    since: datetime
    until: datetime
    # An operator's window (--since/--until) neither reads nor moves the checkpoint, and is not
    # kept as the pending window.
    explicit: bool = False
    # done | pending | rate_limited | unauthorized | failed | locked | timed_out
    state: str = "done"
    detail: str = ""
    rows_read: int = 0
    unparseable: int = 0
    unparseable_examples: list[str] = field(default_factory=list)
    postbacks: int = 0
    already_sent: int = 0
    to_redeliver: int = 0
    redelivered: int = 0
    skipped_already_redelivered: int = 0
    retry_after: float | None = None
    delivery_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.state}: rows {self.rows_read}, postbacks {self.postbacks}, "
            f"redelivered {self.redelivered}, skipped {self.skipped_already_redelivered}"
            + (f"; {self.detail}" if self.detail else "")
        )


@dataclass
class _Postback:
    sent: bool
    row: ExportRow


class AppMetricaExport:
    """GET /logs/v1/export/postbacks.json: 200 rows, 202 'Wait for result', 429, 401/403."""

    def __init__(self, session: requests.Session, source: ReconcileSource) -> None:
        self.session = session
        self.source = source

    def open(self, since: datetime, until: datetime) -> requests.Response:
        timeout = self.source.timeout
        params = {
            "application_id": self.source.application_id,
            "date_since": since.strftime(TIME_FORMAT),
            "date_until": until.strftime(TIME_FORMAT),
            "fields": ",".join(EXPORT_FIELDS),
            "date_dimension": self.source.date_dimension,
        }
        return self.session.get(
            f"{self.source.base_url}/logs/v1/export/postbacks.json",
            params=params,
            headers={
                "Authorization": f"OAuth {self.source.token_value()}",
                "Accept-Encoding": "gzip",
            },
            timeout=(timeout.connect, timeout.read),
            stream=True,
        )

    @staticmethod
    def rows(response: requests.Response) -> Iterator[Any]:
        response.raw.decode_content = True  # gzip is undone as the bytes stream in
        yield from ijson.items(response.raw, "data.item")


@dataclass(eq=False)
class Reconciler:
    """One run per call: read a source's export window, redeliver what failed and never went out."""

    redis: redis.Redis
    keys: RedisKeys
    session: requests.Session
    _: KW_ONLY
    destinations: Destinations
    encoder: TaskMessageEncoder
    delays: DelaySet
    ledger_lease_seconds: float = 7200
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        # Claims and ledger on ``redis`` (the state instance), messages on the delay set's.
        self._enqueue_once = EnqueueOnce(
            self.redis, self.keys, self.ledger_lease_seconds, broker=self.delays.redis
        )
        self._metrics = MetricsRecorder(self.keys)

    def window(self, source: ReconcileSource) -> tuple[datetime, datetime]:
        """From the checkpoint minus the overlap (or the first look-back) to now minus settle.

        A window whose export is still being prepared is reused, so every poll repeats the
        identical request AppMetrica is preparing."""
        pending = self.redis.get(self.keys.reconcile_pending(source.name))
        if pending:
            data = json.loads(pending)
            return _utc(data["since"]), _utc(data["until"])
        now = self.clock()
        checkpoint = self.redis.get(self.keys.reconcile_checkpoint(source.name))
        start = (
            float(checkpoint) - source.overlap_seconds
            if checkpoint
            else now - source.first_look_back_seconds
        )
        until = int(now - source.settle_seconds)
        return _utc(int(start)), _utc(until)

    def run(
        self,
        source: ReconcileSource,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        dry_run: bool = False,
        wait_for_lock: float = 0.0,
    ) -> RunReport:
        """One request for the export; a 202 or 429 is reported, not waited for."""
        report = self._report_for(source, since, until)
        return self._request(source, report, dry_run, wait_for_lock)

    def poll_again_later(
        self, source: ReconcileSource, report: RunReport, task_name: str, queue: str
    ) -> float:
        """AppMetrica is still preparing the export (or has too many queued): park the task
        ``task_name`` for ``source`` in the delay set, so no worker is held while it waits.

        Due after AppMetrica's Retry-After, else the source's poll interval for an export being
        prepared, else a minute. Returns the wait, in seconds."""
        wait = report.retry_after or (source.poll_seconds if report.state == "pending" else 60)
        wire = self.encoder.encode(task_name, queue, (source.name,), argsrepr=f"({source.name!r},)")
        self.delays.schedule(queue, wire, self.clock() + wait)
        return wait

    def run_until_ready(
        self,
        source: ReconcileSource,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        max_wait: float,
        dry_run: bool = False,
        on_wait: Callable[[RunReport, int, float, float], None] = lambda *_: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> RunReport:
        """A run as an operator starts it: the window is fixed once, then the identical request
        is polled while AppMetrica prepares the export, for at most ``max_wait`` seconds.

        AppMetrica answers 202 until the export of that exact query is ready, so a window that
        moved with the clock between polls would never get data. ``on_wait(report, polls,
        elapsed, wait)`` is called before each wait; past ``max_wait`` the state is timed_out.
        """
        window = self._report_for(source, since, until)
        started = self.clock()
        polls = 0
        while True:
            report = RunReport(source.name, window.since, window.until, window.explicit)
            self._request(source, report, dry_run, wait_for_lock=60)
            polls += 1
            if report.state not in WAITING:
                return report
            elapsed = self.clock() - started
            wait = report.retry_after or source.poll_seconds
            if elapsed + wait > max_wait:
                report.state = "timed_out"
                report.detail = (
                    f"{polls} poll(s) in {elapsed:.0f}s, the last answer: {report.detail}"
                )
                return report
            on_wait(report, polls, elapsed, wait)
            sleep(wait)

    def _report_for(
        self, source: ReconcileSource, since: datetime | None, until: datetime | None
    ) -> RunReport:
        """The window of one run: the operator's, completed from the checkpoint's."""
        default_since, default_until = self.window(source)
        explicit = since is not None or until is not None
        return RunReport(source.name, since or default_since, until or default_until, explicit)

    def _request(
        self, source: ReconcileSource, report: RunReport, dry_run: bool, wait_for_lock: float
    ) -> RunReport:
        lock = self.redis.lock(self.keys.lock(f"reconcile:{source.name}"), timeout=3600)
        if not lock.acquire(blocking=wait_for_lock > 0, blocking_timeout=wait_for_lock or None):
            report.state, report.detail = "locked", "another reconcile run holds the lock"
        else:
            self._locked_run(source, report, lock, dry_run)
        if not dry_run:  # for the alerts: a reconciler failing, or no longer running
            with self.redis.pipeline(transaction=False) as pipe:
                self._metrics.reconcile_run(pipe, source.name, report.state, self.clock())
                pipe.execute()
        return report

    def _locked_run(
        self, source: ReconcileSource, report: RunReport, lock: Any, dry_run: bool
    ) -> None:
        try:
            self._run(source, report, dry_run=dry_run)
        finally:
            try:
                lock.release()
            except LockError:
                log.warning("reconcile.lock_lost", source=source.name)

    def _run(self, source: ReconcileSource, report: RunReport, *, dry_run: bool) -> None:
        pending_key = self.keys.reconcile_pending(source.name)
        try:
            response = AppMetricaExport(self.session, source).open(report.since, report.until)
        except requests.RequestException as exc:
            report.state, report.detail = "failed", f"export request failed: {type(exc).__name__}"
            return
        with response:
            status = response.status_code
            if status != 200:
                # A short answer ("Wait for result", an error) is read, so the kept-alive
                # connection goes back to the pool instead of being reset at close.
                response.raw.read(64 * 1024, decode_content=True)
            if status == 202:
                report.state, report.detail = "pending", "export is being prepared"
                # Kept for dry runs too: every poll must repeat the identical request, and a
                # later real run reusing this window leaves no gap (it starts at the checkpoint).
                if not report.explicit:
                    window = {"since": report.since.timestamp(), "until": report.until.timestamp()}
                    self.redis.set(pending_key, json.dumps(window), ex=24 * 3600)
                return
            if status == 429:
                report.state = "rate_limited"
                report.detail = "AppMetrica has 3 exports queued for this application"
                report.retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                return
            if status in {401, 403}:
                report.state, report.detail = "unauthorized", f"HTTP {status}: check the token"
                self.redis.delete(pending_key)
                log.error("reconcile.unauthorized", alarm=True, source=source.name, status=status)
                return
            if status != 200:
                report.state, report.detail = "failed", f"HTTP {status}"
                return
            try:
                groups = self._group(AppMetricaExport.rows(response), report)
            except (ijson.JSONError, requests.RequestException, urllib3.exceptions.HTTPError,
                    OSError) as exc:  # fmt: skip
                # A broken or cut-off export: nothing is enqueued, the checkpoint stays, and
                # the next run asks for a fresh export instead of this one.
                report.state = "failed"
                report.detail = (
                    f"export unreadable after {report.rows_read} row(s): {type(exc).__name__}"
                )
                self.redis.delete(pending_key)
                log.warning("reconcile.export_unreadable", source=source.name, detail=report.detail)
                return
        self._redeliver(source, groups, report, dry_run=dry_run)
        if not dry_run:
            self.redis.delete(pending_key)
            if not report.explicit:
                self.redis.set(
                    self.keys.reconcile_checkpoint(source.name), report.until.timestamp()
                )

    def _group(self, rows: Iterator[Any], report: RunReport) -> dict[str, _Postback]:
        groups: dict[str, _Postback] = {}
        for raw in rows:
            report.rows_read += 1
            try:
                row = ExportRow.model_validate(raw)
            except ValidationError as exc:
                report.unparseable += 1
                if len(report.unparseable_examples) < 5:
                    detail = describe_validation_error(exc)
                    report.unparseable_examples.append(f"row {report.rows_read}: {detail}")
                continue
            seen = groups.get(row.identity)
            if seen is None:
                groups[row.identity] = _Postback(row.notifying_status == "sent", row)
            elif row.notifying_status == "sent":
                seen.sent = True
        report.postbacks = len(groups)
        report.already_sent = sum(1 for g in groups.values() if g.sent)
        report.to_redeliver = report.postbacks - report.already_sent
        return groups

    def _redeliver(self, source: ReconcileSource, groups: dict[str, _Postback],
                   report: RunReport, *, dry_run: bool) -> None:  # fmt: skip
        dest = self.destinations.get(source.redeliver_to)
        failed = [(identity, g.row) for identity, g in groups.items() if not g.sent]
        now = datetime.fromtimestamp(self.clock(), UTC)
        for start in range(0, len(failed), 500):
            chunk = failed[start : start + 500]
            claims = [self.keys.reconciled(source.name, identity) for identity, _ in chunk]
            if dry_run:
                taken = self.redis.exists(*claims) if claims else 0
                report.skipped_already_redelivered += int(taken)
                report.redelivered += len(chunk) - int(taken)
                continue
            items = []
            for (identity, row), claim in zip(chunk, claims, strict=True):
                envelope = DeliveryEnvelope(
                    delivery_id=delivery_id_for(f"reconcile:{source.name}:{identity}", dest.name),
                    destination=dest.name,
                    kind=dest.kind,
                    redelivery=Redelivery(
                        postback_url=row.postback_url,
                        application_id=row.application_id or source.application_id,
                        event_name=row.event_name,
                        conversion_time=_utc(row.conversion_timestamp),
                        source=source.name,
                    ),
                    max_attempts=1 + dest.retry.max_attempts,
                    created_at=now,
                    not_after=now + timedelta(seconds=dest.retry.max_age_seconds),
                )
                wire = self.encoder.encode_envelope(envelope, task_id=envelope.delivery_id)
                queue = queue_for(dest.kind)
                items.append(
                    Enqueue(claim, queue, False, now.timestamp(), wire, envelope.delivery_id, queue)
                )
            flags = self._enqueue_once(items, source.retention_days * 86_400)
            for item, new in zip(items, flags, strict=True):
                if new:
                    report.redelivered += 1
                    report.delivery_ids.append(json.loads(item.wire)["headers"]["id"])
                else:
                    report.skipped_already_redelivered += 1


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
