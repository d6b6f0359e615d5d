"""XMP: events become running daily totals in Redis, flushed as corrected records.

XMP takes aggregates and treats `request_id` as the key for deduplication and correction, so we
keep totals per record key and re-send the current totals under the same request_id: sending
twice is harmless and a late event corrects the day's figure instead of double counting.

Per record key (channel, campaign, adset, ad, country, event, event date, active date, app):
a hash with the totals as integers (micros, never floats) and a version, a HyperLogLog of
device ids for unique users, and membership in the destination's dirty set until a send of
the current version succeeds. One Lua call adds an event, after checking its event id was not
counted before (delivery is at least once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import redis
import requests
import structlog
from redis.exceptions import LockError

from config.destinations import XmpDestination
from config.keys import RedisKeys
from schemas.deadletter import DeadLetter
from schemas.errors import PostbackRelayError
from schemas.event import ConversionEvent
from workers.delivery.ratelimit import PauseRegistry
from workers.logging import mask_secrets
from workers.stores.deadletter import DeadLetterStore

log = structlog.get_logger("postback_relay.xmp")

MICROS = 1_000_000
MAX_ACTIVE_AGE_DAYS = 90
RECORD_TTL_SECONDS = 100 * 24 * 3600  # past the 90-day window, then Redis forgets the totals
SEEN_TTL_SECONDS = 7 * 24 * 3600
_LIMITS = {"campaign_id": 64, "adset_id": 64, "ad_id": 64, "event_name": 64,
           "subsource_id": 128, "app_id": 128}  # fmt: skip

# Nothing is written unless all of it can be: Redis does not roll back a script that fails
# half-way, and a 64-bit HINCRBY overflow would fail after the event was marked as counted.
_ADD_LUA = """
local limit = 9.0e18
for i = 7, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if math.abs(current + tonumber(ARGV[i + 1])) >= limit then return -1 end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('HSETNX', KEYS[2], 'dims', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'count', 1)
for i = 7, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[3] ~= '' then
  redis.call('PFADD', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
return 1
"""

# Clean only if nothing was added since the send started: a late event keeps the key dirty.
_MARK_SENT_LUA = """
local cleaned = 0
for j = 1, #KEYS - 1 do
  if redis.call('HGET', KEYS[j + 1], 'version') == ARGV[2 * j] then
    redis.call('ZREM', KEYS[1], ARGV[2 * j - 1])
    cleaned = cleaned + 1
  end
end
return cleaned
"""


class XmpReject(PostbackRelayError, ValueError):
    """This event cannot become an XMP record; dead-lettered with this reason."""


def _tz(dest: XmpDestination) -> timezone:
    return timezone(timedelta(hours=dest.utc_offset_hours))


@dataclass(frozen=True)
class RecordKey:
    channel: str
    campaign_id: str
    adset_id: str
    ad_id: str
    country: str
    event_name: str
    event_date: str
    active_date: str
    app_id: str
    subsource_id: str | None = None
    timezone: str | None = None

    @property
    def request_id(self) -> str:
        """The seed's recommended concatenation; hashed when longer than 128 characters."""
        parts = [self.channel, self.campaign_id, self.adset_id, self.ad_id, self.country,
                 self.event_name, self.event_date.replace("-", ""),
                 self.active_date.replace("-", ""), self.app_id]  # fmt: skip
        parts += [p for p in (self.subsource_id, self.timezone) if p is not None]
        joined = "_".join(parts)
        return joined if len(joined) <= 128 else hashlib.sha256(joined.encode()).hexdigest()

    def dims(self) -> dict[str, str]:
        out = {
            "channel": self.channel, "campaign_id": self.campaign_id, "adset_id": self.adset_id,
            "ad_id": self.ad_id, "country": self.country, "event_name": self.event_name,
            "event_date": self.event_date, "active_date": self.active_date, "app_id": self.app_id,
        }  # fmt: skip
        if self.subsource_id is not None:
            out["subsource_id"] = self.subsource_id
        if self.timezone is not None:
            out["timezone"] = self.timezone
        return out


def active_date_too_old(active_date: str, dest: XmpDestination, now: datetime) -> bool:
    today = now.astimezone(_tz(dest)).date()
    return date.fromisoformat(active_date) < today - timedelta(days=MAX_ACTIVE_AGE_DAYS)


def record_key_for(dest: XmpDestination, event: ConversionEvent, now: datetime) -> RecordKey:
    """The record an event counts toward, or XmpReject naming the field and rule."""
    source = event.media_source or "organic"
    channel = dest.channels.get(source, source if source in dest.allowed_channels else None)
    if channel is None:
        raise XmpReject(
            f"channel: media source {source!r} maps to no XMP channel; add it to channel_map"
        )
    tz = _tz(dest)
    installed = event.install_time or (event.event_time if event.is_install else None)
    if installed is None:
        raise XmpReject("active_date: the event has no install_time to take it from")
    key = RecordKey(
        channel=channel,
        campaign_id=event.campaign_id or "",
        adset_id=event.adset_id or "",
        ad_id=event.ad_id or "",
        country=event.country or " ",  # XMP: a single space when the country is unknown
        event_name=event.event_name,
        event_date=event.event_time.astimezone(tz).date().isoformat(),
        active_date=installed.astimezone(tz).date().isoformat(),
        app_id=event.app_id,
        subsource_id=(event.site_id or "") if dest.include_subsource else None,
        timezone=dest.timezone if dest.include_timezone else None,
    )
    for name, limit in _LIMITS.items():
        value = getattr(key, name)
        if value is not None and len(value) > limit:
            raise XmpReject(f"{name}: longer than XMP's {limit} characters")
    if active_date_too_old(key.active_date, dest, now):
        raise XmpReject(
            f"active_date: {key.active_date} is older than {MAX_ACTIVE_AGE_DAYS} days; "
            "XMP refuses it"
        )
    return key


def _micros(amount: Decimal | None) -> int:
    return 0 if amount is None else int((amount * MICROS).to_integral_exact())


def _amount_fields(name: str, amount: Decimal | None) -> list[str | int]:
    """Whole units and micros in two 64-bit counters: any numeric(20,6) value stays exact."""
    units, micros = divmod(_micros(amount), MICROS)
    return [f"{name}_units", units, f"{name}_micros", micros]


def _total_micros(fields: dict[str, str], name: str) -> int:
    return int(fields.get(f"{name}_units", 0)) * MICROS + int(fields.get(f"{name}_micros", 0))


def _decimal(micros: int) -> Decimal:
    return (Decimal(micros) / MICROS).quantize(Decimal("0.000001"))


class XmpAggregator:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis = client
        self.keys = keys
        self._add = client.register_script(_ADD_LUA)

    def add(self, dest: XmpDestination, event: ConversionEvent, now: datetime) -> bool:
        """Count ``event`` once; False when this event id was already counted."""
        key = record_key_for(dest, event, now)
        rid = key.request_id
        device = event.advertising_id or event.idfv or event.android_id or event.oaid or ""
        value = event.revenue if dest.event_value == "revenue" else None
        assert event.event_id is not None
        added = self._add(
            keys=[
                self.keys.xmp_seen(dest.name, event.event_id),
                self.keys.xmp_record(dest.name, rid),
                self.keys.xmp_users(dest.name, rid),
                self.keys.xmp_dirty(dest.name),
            ],
            args=[SEEN_TTL_SECONDS, json.dumps(key.dims()), device, rid, RECORD_TTL_SECONDS,
                  now.timestamp(), *_amount_fields("revenue", event.revenue_usd),
                  *_amount_fields("value", value)],
        )  # fmt: skip
        if int(added) < 0:
            raise XmpReject(
                "event_revenue_usd: the record's total would exceed what can be summed exactly"
            )
        return bool(added)


@dataclass(frozen=True)
class XmpRecord:
    request_id: str
    dims: dict[str, str]
    count: int
    revenue_micros: int
    value_micros: int
    unique_users: int
    version: str

    def payload(self, dest: XmpDestination) -> dict[str, Any]:
        body: dict[str, Any] = {**self.dims, "request_id": self.request_id,
                                "event_count": self.count,
                                "event_revenue_usd": _decimal(self.revenue_micros)}  # fmt: skip
        if dest.event_value != "none":
            body["event_value"] = _decimal(self.value_micros)
        if self.unique_users:
            body["event_unique_users"] = self.unique_users
        return body


def dumps_exact(body: Any) -> bytes:
    """JSON with Decimals as exact numbers (never via float: numeric(20,6) needs 20 digits)."""
    marker = f"__decimal_{uuid.uuid4().hex}__"

    def default(value: Any) -> str:
        if isinstance(value, Decimal):
            return f"{marker}{value}"
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    text = json.dumps(body, default=default, separators=(",", ":"))
    return re.sub(rf'"{marker}(-?[0-9.]+)"', r"\1", text).encode()


@dataclass
class FlushReport:
    records: int = 0
    sent: int = 0
    requests: int = 0
    dead_lettered: dict[str, str] = field(default_factory=dict)  # request_id -> reason
    batch_ids: list[str] = field(default_factory=list)
    failed: str | None = None  # why the rest stays dirty
    skipped_locked: bool = False

    def summary(self) -> str:
        if self.skipped_locked:
            return "skipped: another flush is running"
        return (
            f"sent {self.sent} of {self.records} record(s) in {self.requests} request(s); "
            f"dead-lettered {len(self.dead_lettered)}" + (f"; {self.failed}" if self.failed else "")
        )


class _Stop(PostbackRelayError):
    """The destination refused us as a whole (401): stop this flush."""


class XmpFlusher:
    """Sends dirty records in batches of <= 200; one flush per destination at a time."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        session: requests.Session,
        *,
        dead_letters: DeadLetterStore,
        pauses: PauseRegistry,
        record_attempt: Callable[[dict[str, Any]], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.session = session
        self.dead_letters = dead_letters
        self.pauses = pauses
        self.record_attempt = record_attempt or (lambda _fields: None)
        self.sleep = sleep
        self._mark_sent = client.register_script(_MARK_SENT_LUA)

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
                records.append(
                    XmpRecord(rid, json.loads(fields["dims"]), int(fields["count"]),
                              _total_micros(fields, "revenue"), _total_micros(fields, "value"),
                              int(users), fields["version"])
                )  # fmt: skip
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
            for start in range(0, len(fresh), dest.batch_size):
                # Each batch renews the lock: a long outage must not let a second flush start.
                lock.reacquire()
                self._send_with_retries(dest, fresh[start : start + dest.batch_size], report)
        except _Stop as stop:
            report.failed = str(stop)
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

    def _send_with_retries(
        self, dest: XmpDestination, batch: Sequence[XmpRecord], report: FlushReport
    ) -> None:
        for attempt in range(dest.retry.max_attempts + 1):
            problem = self._send(dest, batch, report)
            if problem is None:
                return
            if attempt < dest.retry.max_attempts:
                self.sleep(dest.retry.delay_for(attempt + 1))
        report.failed = f"{problem}; {len(batch)} record(s) stay dirty for the next flush"
        log.warning("xmp.batch_failed", destination=dest.name, reason=problem, records=len(batch))

    def _send(
        self, dest: XmpDestination, batch: Sequence[XmpRecord], report: FlushReport
    ) -> str | None:
        """Send one batch; None when settled (sent, or bad records isolated), else a reason."""
        body = {"xmp_token": dest.secret("xmp_token"), "activity_kind": "in-app-event-agg",
                "data": [r.payload(dest) for r in batch]}  # fmt: skip
        started = time.perf_counter()
        report.requests += 1
        try:
            response = self.session.post(
                dest.url, data=dumps_exact(body), headers={"Content-Type": "application/json"},
                timeout=(dest.timeout.connect, dest.timeout.read),
            )  # fmt: skip
            status = response.status_code
            text = mask_secrets(response.text[:2048], dest.secrets_to_mask())
        except requests.RequestException as exc:
            self._record(
                dest, batch, None, body=type(exc).__name__, started=started, batch_id=None, ok=False
            )
            return f"request failed ({type(exc).__name__})"
        answer = _parse(text)
        code = answer.get("code") if isinstance(answer.get("code"), int) else status
        msg = str(answer.get("msg", ""))[:500]
        batch_id = str(answer.get("batch_id", "")) or None
        accepted = status == 200 and code == 200
        self._record(
            dest, batch, status, body=text, started=started, batch_id=batch_id, ok=accepted
        )
        if accepted:
            self._sent(dest, batch, report, batch_id)
            return None
        if code == 401 or status in {401, 403}:
            self.pauses.pause(dest.name, 24 * 3600, f"XMP {code}: {msg}")
            log.error("destination.paused", alarm=True, destination=dest.name, reason=msg,
                      resume_with=f"postback-relay destinations resume {dest.name}")  # fmt: skip
            raise _Stop(f"XMP answered {code} {msg}: destination paused")
        if code == 400 or (400 <= status < 500 and status not in {408, 429}):
            if len(batch) == 1:
                self._dead_letter(dest, batch[0], f"XMP rejected the record: {code} {msg}", report)
                return None
            middle = len(batch) // 2  # bisect until the rejected records stand alone
            for half in (batch[:middle], batch[middle:]):
                self._send_with_retries(dest, half, report)
            return None
        return f"XMP answered HTTP {status} code {code} {msg}".strip()

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
        self.dead_letters.add(
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

    def _record(
        self, dest: XmpDestination, batch: Sequence[XmpRecord], status: int | None, *,
        body: str, started: float, batch_id: str | None, ok: bool,
    ) -> None:  # fmt: skip
        now = datetime.now(UTC)
        self.record_attempt({
            "attempt_datetime": now.strftime("%Y-%m-%d %H:%M:%S"),
            "attempt_timestamp": int(now.timestamp()),
            "notifying_status": "sent" if ok else "failed",
            "response_code": "" if status is None else status,
            "response_body": body[:300],
            "postback_url": dest.url,
            "postback_method": "POST",
            "destination": dest.name,
            "records": len(batch),
            "batch_id": batch_id or "",
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        })  # fmt: skip


def _parse(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def iter_payloads(dest: XmpDestination, records: Sequence[XmpRecord]) -> Iterator[list[Any]]:
    """What a flush would send, batch by batch (the token left out): for --dry-run."""
    for start in range(0, len(records), dest.batch_size):
        yield [r.payload(dest) for r in records[start : start + dest.batch_size]]
