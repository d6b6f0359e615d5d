"""The attempt log: one record per HTTP attempt, named like AppMetrica's postbacks export.

Kept in a capped Redis stream (XADD MAXLEN ~), so retention is bounded by count and tools that
read AppMetrica's export can read ours with the same field names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import redis

from config.keys import RedisKeys
from schemas.envelope import AttemptSummary, DeliveryEnvelope
from schemas.outcomes import Delivered, Outcome
from workers.kinds.base import OutgoingRequest


class AttemptLog:
    # The age bound is trimmed at most this often per process: XTRIM's approximate trim drops
    # whole stream nodes anyway, and a command per record was a delivery's CPU for nothing.
    AGE_TRIM_EVERY_SECONDS = 1.0

    def __init__(
        self, client: redis.Redis, keys: RedisKeys, max_records: int, max_age_seconds: int = 0
    ) -> None:
        self.redis = client
        self.keys = keys
        self.max_records = max_records
        self.max_age_seconds = max_age_seconds
        self._next_age_trim = 0.0  # time.monotonic() after which the next append trims by age

    def record(
        self,
        pipe: Any,
        envelope: DeliveryEnvelope,
        request: OutgoingRequest,
        outcome: Outcome,
        summary: AttemptSummary,
    ) -> None:
        fields: dict[Any, Any] = {
            "attempt_datetime": summary.at.strftime("%Y-%m-%d %H:%M:%S"),
            "attempt_timestamp": int(summary.at.timestamp()),
            "notifying_status": "sent" if isinstance(outcome, Delivered) else "failed",
            "response_code": "" if summary.status is None else summary.status,
            "response_body": summary.body_excerpt,
            "postback_url": request.display_url,
            "postback_method": request.method,
            "conversion_datetime": envelope.conversion_time.strftime("%Y-%m-%d %H:%M:%S"),
            "conversion_timestamp": int(envelope.conversion_time.timestamp()),
            "event_name": envelope.event_name,
            "application_id": envelope.app_id,
            "destination": envelope.destination,
            "delivery_id": envelope.delivery_id,
            "attempt": envelope.attempt + 1,
            "error": summary.error or "",
            "duration_ms": summary.duration_ms,
            "attribution": json.dumps(outcome.attribution)
            if isinstance(outcome, Delivered) and outcome.attribution is not None
            else "",
        }
        self._append(pipe, fields, summary.at.timestamp())

    def record_fields(self, fields: dict[Any, Any]) -> None:
        """A record that is not one delivery's attempt (an XMP batch): same stream, same names."""
        with self.redis.pipeline(transaction=False) as pipe:
            self._append(pipe, fields, float(fields["attempt_timestamp"]))
            pipe.execute()

    def _append(self, pipe: Any, fields: dict[Any, Any], at: float) -> None:
        """Every record goes through here, so both retention bounds apply to all of them."""
        pipe.xadd(self.keys.attempts(), fields, maxlen=self.max_records, approximate=True)
        now = time.monotonic()
        if self.max_age_seconds and now >= self._next_age_trim:
            self._next_age_trim = now + self.AGE_TRIM_EVERY_SECONDS
            # Stream ids are milliseconds: everything before this id is older than the limit.
            oldest = int((at - self.max_age_seconds) * 1000)
            pipe.xtrim(self.keys.attempts(), minid=f"{max(oldest, 0)}-0", approximate=True)

    def iter_records(self, since: datetime | None = None) -> Iterator[dict[str, str]]:
        start = f"{int(since.timestamp() * 1000)}-0" if since else "-"
        while True:
            batch: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(  # type: ignore[assignment]
                self.keys.attempts(), min=start, max="+", count=1000
            )
            if not batch:
                return
            for _record_id, fields in batch:
                yield {k.decode(): v.decode() for k, v in fields.items()}
            start = "(" + batch[-1][0].decode()

    def count(self) -> int:
        return int(self.redis.xlen(self.keys.attempts()))
