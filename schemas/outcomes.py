"""What a delivery attempt came to, as values: adapters return them, the pipeline acts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args


@dataclass(frozen=True)
class RateBudget:
    """What the destination says is left of its own window (e.g. X's x-rate-limit-* headers)."""

    remaining: int
    reset_at: float  # epoch seconds


@dataclass(frozen=True)
class Delivered:
    status: int
    body_excerpt: str = ""
    attribution: dict[str, Any] | None = None  # what the partner claimed, kept with the attempt
    budget: RateBudget | None = None


@dataclass(frozen=True)
class RetryLater:
    """A transient failure; ``after`` is the destination's own wait (Retry-After), if given."""

    reason: str
    status: int | None = None
    body_excerpt: str = ""
    after: float | None = None
    budget: RateBudget | None = None


@dataclass(frozen=True)
class PermanentFailure:
    """Sending this again will not help (a 4xx other than 408/425/429): dead-letter it now."""

    reason: str
    status: int | None = None
    body_excerpt: str = ""
    alarm: bool = False
    pause_seconds: float | None = None  # e.g. bad credentials: stop sending until resumed
    budget: RateBudget | None = None


@dataclass(frozen=True)
class Skipped:
    """Nothing to send for this event (e.g. no device id X can use); recorded, not an error."""

    reason: str


Outcome = Delivered | RetryLater | PermanentFailure | Skipped


@dataclass(frozen=True)
class Aggregated:
    """Counted into a kind's running totals (XMP); a periodic flush sends them, not this task."""

    detail: str


DeliveryStatus = Literal[
    "delivered", "retry_scheduled", "deferred", "dead_lettered", "skipped", "aggregated"
]
"""How the pipeline left a delivery: the task's return value, a metrics label, a ledger state."""

DELIVERY_STATUSES: tuple[DeliveryStatus, ...] = get_args(DeliveryStatus)
# Done with: nothing of the delivery is left to publish again (the ledger forgets it).
TERMINAL_STATUSES: frozenset[DeliveryStatus] = frozenset(
    {"delivered", "dead_lettered", "skipped", "aggregated"}
)
