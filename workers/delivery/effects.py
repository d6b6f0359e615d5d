"""What an answer does beyond its own attempt, written once for every destination kind: pause
the destination when it asks, raise the alarms, keep the dead letter."""

from __future__ import annotations

import structlog

from schemas.deadletter import DeadLetter
from schemas.envelope import DeliveryEnvelope
from schemas.outcomes import Outcome, PermanentFailure, RetryLater
from workers.delivery.ratelimit import PauseRegistry
from workers.stores.deadletter import DeadLetterStore

log = structlog.get_logger("postback_relay.pipeline")


class OutcomeEffects:
    def __init__(self, pauses: PauseRegistry, dead_letters: DeadLetterStore) -> None:
        self.pauses = pauses
        self.dead_letters = dead_letters

    def pause_if_asked(self, destination: str, outcome: Outcome) -> None:
        """A 429/503 with Retry-After pauses the destination for that long; a credentials
        failure pauses it until an operator resumes it. Call it first, before anything is
        recorded: every other worker stops sending from then on."""
        if isinstance(outcome, RetryLater):
            if outcome.after is not None and outcome.status in {429, 503}:
                self.pauses.pause(destination, outcome.after, outcome.reason)
            return
        if not isinstance(outcome, PermanentFailure):
            return
        if outcome.pause_seconds:
            self.pauses.pause(destination, outcome.pause_seconds, outcome.reason)
            log.error(
                "destination.paused",
                alarm=True,
                destination=destination,
                reason=outcome.reason,
                resume_with=f"postback-relay destinations resume {destination}",
            )
        if outcome.alarm:
            log.error(
                "destination.auth_failed",
                alarm=True,
                destination=destination,
                status=outcome.status,
                hint="check this destination's credentials",
            )

    def dead_letter_envelope(self, envelope: DeliveryEnvelope, failure: PermanentFailure) -> None:
        """Keep a delivery that will not be sent again, replayable, with what ended it."""
        entry = self.dead_letters.add_envelope(
            envelope, failure.reason, failure.status, failure.body_excerpt
        )
        self._logged(entry)

    def dead_letter(self, entry: DeadLetter) -> None:
        """A dead letter that is not one delivery's (an XMP record the partner refused)."""
        self.dead_letters.add(entry)
        self._logged(entry)

    @staticmethod
    def _logged(entry: DeadLetter) -> None:
        log.error(
            "delivery.dead_lettered",
            destination=entry.destination,
            reason=entry.reason,
            status=entry.status,
        )
