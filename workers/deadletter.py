"""The dead-letter store: deliveries that will not be retried, with their whole history.

Redis has no dead-letter exchange (a rejected message is simply gone), so the store is ours:
a hash of entries by delivery id plus a sorted index by time for listing and replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import redis
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from config.keys import RedisKeys
from schemas.envelope import DeliveryEnvelope


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    delivery_id: str
    destination: str
    reason: str = Field(max_length=1000)
    status: int | None = None
    body_excerpt: str = Field(default="", max_length=1024)
    dead_at: AwareDatetime
    envelope: DeliveryEnvelope | None = None
    raw_message: str | None = Field(
        default=None, max_length=4096, description="for poison messages: what could be read"
    )


class DeadLetterStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis = client
        self.keys = keys

    def add(self, entry: DeadLetter) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.dead_letters(), entry.delivery_id, entry.model_dump_json())
            pipe.zadd(self.keys.dead_letter_index(), {entry.delivery_id: entry.dead_at.timestamp()})
            pipe.execute()

    def add_envelope(
        self,
        envelope: DeliveryEnvelope,
        reason: str,
        status: int | None = None,
        body_excerpt: str = "",
    ) -> DeadLetter:
        entry = DeadLetter(
            delivery_id=envelope.delivery_id,
            destination=envelope.destination,
            reason=reason[:1000],
            status=status,
            body_excerpt=body_excerpt[:1024],
            dead_at=datetime.now(UTC),
            envelope=envelope,
        )
        self.add(entry)
        return entry

    def get(self, delivery_id: str) -> DeadLetter | None:
        raw = self.redis.hget(self.keys.dead_letters(), delivery_id)
        return DeadLetter.model_validate_json(raw) if raw else None

    def count(self) -> int:
        return int(self.redis.zcard(self.keys.dead_letter_index()))

    def iter_entries(self, since: float = 0.0) -> Iterator[DeadLetter]:
        ids: list[bytes] = self.redis.zrangebyscore(  # type: ignore[assignment]
            self.keys.dead_letter_index(), since, "+inf"
        )
        for start in range(0, len(ids), 200):
            chunk = ids[start : start + 200]
            for raw in self.redis.hmget(self.keys.dead_letters(), chunk):
                if raw:
                    yield DeadLetter.model_validate_json(raw)
