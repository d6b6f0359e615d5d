"""One attempt record: what every writer puts in the attempt log, under AppMetrica's
postbacks-export field names, so tools that read AppMetrica's export read ours."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from schemas.envelope import DeliveryEnvelope
from schemas.outcomes import Delivered, Outcome

_EXPORT_TIME = "%Y-%m-%d %H:%M:%S"


class AttemptRecord(BaseModel):
    """One HTTP attempt: a delivery's, or a batch of aggregated records' (XMP). Fields in the
    order they are written; a field that is None does not belong to this kind of attempt and
    is left out of the stream (``response_code`` is the exception: "" when there was none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempt_datetime: str
    attempt_timestamp: int
    notifying_status: Literal["sent", "failed"]
    response_code: int | None
    response_body: str
    postback_url: str  # masked: what may be logged
    postback_method: str
    # One delivery's attempt.
    conversion_datetime: str | None = None
    conversion_timestamp: int | None = None
    event_name: str | None = None
    application_id: str | None = None
    destination: str
    delivery_id: str | None = None
    attempt: int | None = None  # 1 for the first send
    # A batch of aggregated records.
    records: int | None = None
    batch_id: str | None = None
    error: str = ""
    duration_ms: float
    attribution: str = ""  # JSON of what the partner claimed, when it did

    @classmethod
    def of(
        cls,
        outcome: Outcome,
        *,
        at: datetime,
        url: str,
        method: str,
        destination: str,
        duration_ms: float,
        envelope: DeliveryEnvelope | None = None,
        records: int | None = None,
        batch_id: str | None = None,
    ) -> AttemptRecord:
        """The record of one answer; ``envelope`` (as it was before this attempt) for a
        delivery, ``records`` and ``batch_id`` for a batch."""
        delivered = isinstance(outcome, Delivered)
        conversion = envelope.conversion_time if envelope is not None else None
        return cls(
            attempt_datetime=at.strftime(_EXPORT_TIME),
            attempt_timestamp=int(at.timestamp()),
            notifying_status="sent" if delivered else "failed",
            response_code=getattr(outcome, "status", None),
            response_body=getattr(outcome, "body_excerpt", "")[:300],
            postback_url=url,
            postback_method=method,
            conversion_datetime=conversion.strftime(_EXPORT_TIME) if conversion else None,
            conversion_timestamp=int(conversion.timestamp()) if conversion else None,
            event_name=envelope.event_name if envelope is not None else None,
            application_id=envelope.app_id if envelope is not None else None,
            destination=destination,
            delivery_id=envelope.delivery_id if envelope is not None else None,
            attempt=envelope.attempt + 1 if envelope is not None else None,
            records=records,
            batch_id=batch_id,
            error="" if delivered else getattr(outcome, "reason", ""),
            duration_ms=duration_ms,
            attribution=json.dumps(outcome.attribution)
            if isinstance(outcome, Delivered) and outcome.attribution is not None
            else "",
        )

    def to_stream(self) -> dict[str, str | int | float]:
        """The fields as the attempt log stores them, in order."""
        return {
            name: "" if value is None else value
            for name, value in self
            if value is not None or name == "response_code"
        }


BATCH_FIELDS = ("records", "batch_id")
# What `attempts export --format csv` writes: AppMetrica's columns, a batch's extras left out.
EXPORT_FIELDS = tuple(name for name in AttemptRecord.model_fields if name not in BATCH_FIELDS)
