"""XMP's per-event step: events become running daily totals in Redis (the flush sends them).

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

import hashlib
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, ClassVar

import redis

from config.destination_base import DestinationBase
from config.keys import RedisKeys
from config.kinds.xmp import XmpDestination
from schemas.envelope import DeliveryEnvelope
from schemas.errors import PostbackRelayError
from schemas.event import ConversionEvent
from schemas.outcomes import Aggregated, PermanentFailure, Skipped
from workers.broker.scripts import load_script

MICROS = 1_000_000
MAX_ACTIVE_AGE_DAYS = 90
RECORD_TTL_SECONDS = 100 * 24 * 3600  # past the 90-day window, then Redis forgets the totals
SEEN_TTL_SECONDS = 7 * 24 * 3600
_LIMITS = {"campaign_id": 64, "adset_id": 64, "ad_id": 64, "event_name": 64,
           "subsource_id": 128, "app_id": 128}  # fmt: skip


# Nothing is written unless all of it can be: Redis does not roll back a script that fails
# half-way, and a 64-bit HINCRBY overflow would fail after the event was marked as counted.
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
    """The pipeline's hook for xmp destinations (an ``EventAggregator``): count, never send."""

    kind: ClassVar[str] = "xmp"

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis = client
        self.keys = keys
        self._add = load_script(client, "workers.kinds.xmp", "xmp_add")

    def accept(
        self, destination: DestinationBase, envelope: DeliveryEnvelope, now: datetime
    ) -> Aggregated | Skipped | PermanentFailure:
        assert isinstance(destination, XmpDestination), "the xmp kind has xmp destinations"
        try:
            added = self.add(destination, envelope.require_event(), now)
        except XmpReject as exc:
            return PermanentFailure(str(exc))
        if not added:
            return Skipped("already counted (same event id)")
        return Aggregated("added to the day's totals")

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

    @classmethod
    def from_stored(cls, request_id: str, fields: dict[str, str], unique_users: int) -> XmpRecord:
        """The record as its hash and HyperLogLog hold it now."""
        return cls(request_id, json.loads(fields["dims"]), int(fields["count"]),
                   _total_micros(fields, "revenue"), _total_micros(fields, "value"),
                   unique_users, fields["version"])  # fmt: skip

    def payload(self, dest: XmpDestination) -> dict[str, Any]:
        body: dict[str, Any] = {**self.dims, "request_id": self.request_id,
                                "event_count": self.count,
                                "event_revenue_usd": _decimal(self.revenue_micros)}  # fmt: skip
        if dest.event_value != "none":
            body["event_value"] = _decimal(self.value_micros)
        if self.unique_users:
            body["event_unique_users"] = self.unique_users
        return body
