"""One base class per destination: HTTP, limits and retries are written once, in workers/delivery
(sender, pipeline); each adapter builds its request and, where the partner has its own error
format, classifies."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Protocol

from config.destination_base import DestinationBase
from schemas.envelope import DeliveryEnvelope
from schemas.outcomes import Aggregated, Delivered, Outcome, PermanentFailure, RetryLater, Skipped
from workers.delivery.http import HttpAnswer, HttpFailure, retry_after_seconds

# Enough to parse a partner's JSON answer (X's attribution); records keep a shorter excerpt.
RESPONSE_READ_BYTES = 64 * 1024
RETRYABLE_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class OutgoingRequest:
    """A request ready to send. ``display_url`` has every secret masked: it is what gets logged."""

    method: str
    url: str
    display_url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    follow_redirects: bool = True


class DestinationAdapter(ABC):
    kind: ClassVar[str]
    # True when the partner announces what is left of its own window (rate-limit headers).
    uses_server_budget: ClassVar[bool] = False
    # False for a kind that counts deliveries into totals its periodic flush sends (XMP): a
    # delivery of it makes no request of its own, so it takes no rate-limit send time.
    sends_each_delivery: ClassVar[bool] = True

    def __init__(self, destination: DestinationBase) -> None:
        self.destination = destination

    @abstractmethod
    def build_request(
        self, envelope: DeliveryEnvelope
    ) -> OutgoingRequest | Skipped | PermanentFailure:
        """The exact request, Skipped when there is nothing to send, or PermanentFailure when
        it must never be sent (it is dead-lettered with the reason)."""

    def rate_limit_key(self, envelope: DeliveryEnvelope) -> str:
        """Which shared limiter this delivery counts against (the destination, by default)."""
        return self.destination.name

    def classify(self, answer: HttpAnswer, body_excerpt: str) -> Outcome:
        """2xx delivered; 408/425/429/5xx retry; other 4xx permanent (401/403 also alarm)."""
        status = answer.status
        if 200 <= status < 300:
            return Delivered(status, body_excerpt)
        if status in RETRYABLE_STATUSES or status >= 500:
            return RetryLater(
                f"HTTP {status}",
                status,
                body_excerpt,
                retry_after_seconds(answer.header("Retry-After")),
            )
        return PermanentFailure(f"HTTP {status}", status, body_excerpt, alarm=status in {401, 403})

    def classify_error(self, failure: HttpFailure) -> Outcome:
        """Timeouts, refused connections and DNS failures are transient."""
        if failure.kind == "timeout":
            return RetryLater(f"timeout ({failure.name})")
        if failure.kind == "connection":
            return RetryLater(f"connection error ({failure.name})")
        return PermanentFailure(f"request error ({failure.name})")


class EventAggregator(Protocol):
    """The per-delivery step of a kind that takes totals, not events (XMP): the pipeline hands
    each delivery of that kind here instead of sending it; the kind's periodic flush sends."""

    kind: ClassVar[str]

    def accept(
        self, destination: DestinationBase, envelope: DeliveryEnvelope, now: datetime
    ) -> Aggregated | Skipped | PermanentFailure:
        """Counted, already counted (Skipped), or never countable (dead-lettered)."""
        ...
