"""A Celery consumer that dead-letters messages it cannot run, instead of dropping them.

Celery acks (or, on Redis, effectively deletes) a message whose body cannot be decoded or
whose task is unknown, leaving only a log line. Here such a message goes to the dead-letter
store with what could be read of it and why, and the worker keeps consuming.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from celery.worker.consumer import Consumer

from workers.deadletter import DeadLetter

log = structlog.get_logger("postback_relay.consumer")


class DeadLetteringConsumer(Consumer):
    def _dead_letter(self, message: Any, reason: str) -> None:
        headers = getattr(message, "headers", None) or {}
        message_id = str(headers.get("id") or uuid.uuid4())
        try:
            body = message.body
            raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else repr(body)
        except Exception:
            raw = "<unreadable>"
        entry = DeadLetter(
            delivery_id=f"poison-{message_id}",
            destination="?",
            reason=f"poison message: {reason}"[:1000],
            dead_at=datetime.now(UTC),
            raw_message=raw[:4096],
        )
        self.app.runtime.pipeline.dead_letters.add(entry)  # type: ignore[attr-defined]
        log.error("delivery.poison_message", reason=reason, message_id=message_id)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"cannot decode body ({type(exc).__name__}: {exc})")
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not a Celery task message")
        message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (getattr(message, "headers", None) or {}).get("task", "?")
        self._dead_letter(message, f"unknown task {name!r}")
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, f"invalid task message ({exc})")
        message.ack()
