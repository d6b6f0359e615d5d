"""The dead letter: a delivery that will not be retried, with why and all that is left of it.

Kept by the dead-letter store (workers/stores/deadletter.py), written by every worker path that
gives up on a delivery, and read back by the CLI's list, export and replay."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.envelope import DeliveryEnvelope


class DeadLetter(BaseModel):
    """One entry of the dead-letter store; a poison message keeps its raw queue item."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delivery_id: str
    destination: str
    reason: str = Field(max_length=1000)
    status: int | None = None
    body_excerpt: str = Field(default="", max_length=1024)
    dead_at: AwareDatetime
    envelope: DeliveryEnvelope | None = None
    raw_message: str | None = Field(
        default=None,
        description="for poison messages: the item as it was on the queue, or what could be "
        "read of it; UTF-8 text, or base64 when raw_encoding says so",
    )
    raw_encoding: Literal["utf-8", "base64"] | None = None
    queue: str | None = Field(default=None, description="the queue a poison message came from")

    @classmethod
    def poison(
        cls, reason: str, item: bytes, queue: str | None, message_id: str | None = None
    ) -> DeadLetter:
        """A queue item that cannot be run, kept whole: as text when it is UTF-8, else base64."""
        encoding: Literal["utf-8", "base64"] = "utf-8"
        try:
            raw = item.decode("utf-8")
        except UnicodeDecodeError:
            raw, encoding = base64.b64encode(item).decode("ascii"), "base64"
        return cls(
            delivery_id=f"poison-{message_id or uuid.uuid4()}",
            destination="?",
            reason=f"poison message: {reason}"[:1000],
            dead_at=datetime.now(UTC),
            raw_message=raw,
            raw_encoding=encoding,
            queue=queue,
        )

    def raw_bytes(self) -> bytes | None:
        """The poison item's bytes, as they were on the queue."""
        if self.raw_message is None:
            return None
        if self.raw_encoding == "base64":
            return base64.b64decode(self.raw_message)
        return self.raw_message.encode("utf-8")

    @property
    def reason_category(self) -> str:
        """The reason without its particulars, for counting: "attempts exhausted", "HTTP 400"."""
        head = self.reason.split(":", 1)[0]
        return re.sub(r"\s*\(.*?\)", "", head).strip()
