"""The attempt log: one AttemptRecord per HTTP attempt, named like AppMetrica's postbacks export.

Kept in a capped Redis stream (XADD MAXLEN ~), so retention is bounded by count and tools that
read AppMetrica's export can read ours with the same field names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import redis

from config.keys import RedisKeys
from schemas.attempts import AttemptRecord


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

    def record(self, pipe: Any, record: AttemptRecord) -> None:
        """Append ``record`` within the caller's Redis pipeline (one round trip with the rest)."""
        self._append(pipe, record.to_stream(), record.attempt_timestamp)

    def add(self, record: AttemptRecord) -> None:
        """Append ``record`` now, for a writer that has no pipeline of its own (an XMP flush)."""
        with self.redis.pipeline(transaction=False) as pipe:
            self.record(pipe, record)
            pipe.execute()

    def _append(self, pipe: Any, fields: dict[str, str | int | float], at: float) -> None:
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
