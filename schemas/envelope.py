"""The delivery envelope: what travels on a destination queue for one (event, destination) pair."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from schemas.errors import PostbackRelayError, describe_validation_error
from schemas.event import ConversionEvent

# uuid5 namespace for delivery ids; changing it would break deduplication across a deploy.
_DELIVERY_NAMESPACE = uuid.UUID("8f0c2a52-54a4-4f55-9d0e-5a6d0c1f9a11")


def delivery_id_for(event_id: str, destination: str) -> str:
    """Deterministic idempotency key of one delivery: the same event to the same destination."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{destination}\n{event_id}"))


class PoisonMessage(PostbackRelayError, ValueError):
    """A queued message that cannot be decoded or validated; it is dead-lettered, never retried."""


class AttemptSummary(BaseModel):
    """One HTTP attempt as the envelope remembers it (the full record is in the attempt log)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: AwareDatetime
    status: int | None = None
    outcome: str
    error: str | None = Field(default=None, max_length=500)
    body_excerpt: str = Field(default="", max_length=300)
    duration_ms: float = 0.0


class Redelivery(BaseModel):
    """A postback another system failed to deliver (AppMetrica's export), sent again by URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    postback_url: str = Field(min_length=8, max_length=8192)
    application_id: str = Field(max_length=64)
    event_name: str = Field(default="", max_length=256)
    conversion_time: AwareDatetime
    source: str = Field(max_length=64, description="the reconciler source that found it")


class DeliveryEnvelope(BaseModel):
    """One delivery. ``attempt`` counts HTTP attempts already made (0 on the first run).

    It carries either an ``event`` (produce()) or a ``redelivery`` (the reconciler)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delivery_id: str = Field(min_length=1, max_length=64)
    destination: str = Field(min_length=1, max_length=64)
    kind: str = Field(min_length=1, max_length=32)
    event: ConversionEvent | None = None
    redelivery: Redelivery | None = None
    attempt: int = Field(default=0, ge=0)
    max_attempts: int = Field(ge=1, le=11, description="HTTP attempts in all: 1 + retries.")
    created_at: AwareDatetime
    not_after: AwareDatetime | None = None
    history: list[AttemptSummary] = Field(default_factory=list, max_length=20)
    # The send time this attempt reserved under its destination's rate limit (epoch seconds,
    # Redis's clock), set when the delivery was parked to wait for it: it then sends without
    # asking again. Left out of the message when None, so workers before 0.4 still read it.
    reserved_at: float | None = Field(default=None, exclude_if=lambda value: value is None)

    @model_validator(mode="after")
    def _one_payload(self) -> DeliveryEnvelope:
        if (self.event is None) == (self.redelivery is None):
            raise ValueError("event/redelivery: exactly one of the two must be given")
        return self

    def require_event(self) -> ConversionEvent:
        if self.event is None:
            raise PoisonMessage(f"envelope: a {self.kind} delivery needs an event")
        return self.event

    @property
    def event_name(self) -> str:
        if self.event is not None:
            return self.event.event_name
        assert self.redelivery is not None
        return self.redelivery.event_name

    @property
    def conversion_time(self) -> datetime:
        if self.event is not None:
            return self.event.event_time
        assert self.redelivery is not None
        return self.redelivery.conversion_time

    @property
    def app_id(self) -> str:
        if self.event is not None:
            return self.event.app_id
        assert self.redelivery is not None
        return self.redelivery.application_id

    def after_attempt(self, summary: AttemptSummary) -> DeliveryEnvelope:
        """The envelope for the next try: attempt counted, this attempt remembered."""
        return self.model_copy(
            update={
                "attempt": self.attempt + 1,
                "history": [*self.history, summary][-20:],
                "reserved_at": None,  # spent: the next attempt reserves its own time
            }
        )

    def task_argsrepr(self) -> str:
        """What Flower and logs show of a task's arguments: no device ids, no personal data."""
        return (
            f"{{'delivery_id': {self.delivery_id!r}, 'destination': {self.destination!r}, "
            f"'event_name': {self.event_name!r}, 'attempt': {self.attempt + 1}}}"
        )

    def to_task_arg(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def retries_counted(self) -> str:
        """Counted as the destinations file counts them: ``retry.max_attempts`` (and a route's
        ``max_delivery_attempts``) are retries after the first send."""
        allowed = self.max_attempts - 1
        if allowed == 0:
            return "first send; no retries allowed"
        return f"first send + {self.attempt - 1} of {allowed} retries"

    def expired(self, now: datetime) -> bool:
        return self.not_after is not None and now >= self.not_after

    @classmethod
    def from_task_arg(cls, data: Any) -> DeliveryEnvelope:
        if not isinstance(data, dict):
            raise PoisonMessage(f"envelope: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PoisonMessage("envelope: " + describe_validation_error(exc)) from None
