"""A Celery consumer that dead-letters messages it cannot run, instead of dropping them.

Celery acks (or, on Redis, effectively deletes) a message whose body cannot be decoded, whose
task is unknown, or whose arguments do not fit the task (a TypeError before the task body
runs), leaving only a log line. Here such a message goes to the dead-letter store as it was on
the queue, with why, and the worker keeps consuming.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

import structlog
from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from celery.worker.request import Request

log = structlog.get_logger("postback_relay.consumer")


class CheckedRequest(Request):
    """Rejects a message whose arguments cannot be passed to its task, before the task runs:
    Celery's ``on_invalid_task`` (below) then dead-letters it. Celery itself would call the
    task and fail it with a TypeError (args given as a string are spread into characters)."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (ValueError, TypeError) as exc:  # the body is not [args, kwargs, embed]
            raise InvalidTaskError(f"body is not [args, kwargs, options]: {exc}") from exc
        task_args, task_kwargs = self.args, self.kwargs
        if not isinstance(task_args, list | tuple) or not isinstance(task_kwargs, dict):
            raise InvalidTaskError(
                f"args must be a list and kwargs an object, got {type(task_args).__name__} "
                f"and {type(task_kwargs).__name__}"
            )
        try:
            _signature(self.task.run).bind(*task_args, **task_kwargs)
        except TypeError as exc:
            raise InvalidTaskError(f"arguments do not fit {self.task.name}: {exc}") from exc


@functools.cache
def _signature(run: Any) -> inspect.Signature:
    """A task's signature, computed once (each message checks its arguments against it)."""
    return inspect.signature(run)


class CheckedTask(Task):  # type: ignore[type-arg]
    Request = "workers.broker.consumer:CheckedRequest"


class DeadLetteringConsumer(Consumer):
    def _dead_letter(self, message: Any, reason: str) -> None:
        headers = getattr(message, "headers", None) or {}
        message_id = headers.get("id")
        delivery_info = getattr(message, "delivery_info", None) or {}
        # Kept with Redis alone (workers/runtime.py): under the prefork pool this runs in the
        # main process, which never delivers and so never builds the pipeline or HTTP session.
        keep = self.app.runtime.keep_unreadable_item  # type: ignore[attr-defined]
        entry = keep(
            delivery_info.get("routing_key"),
            _raw_item(message),
            reason,
            str(message_id) if message_id else None,
        )
        log.error("delivery.poison_message", alarm=True, reason=reason, message_id=message_id,
                  queue=entry.queue, dead_letter=entry.delivery_id)  # fmt: skip

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


def _raw_item(message: Any) -> bytes:
    """The message as it was on the queue; its body alone where the transport is not ours."""
    raw_item = getattr(message, "raw_item", None)
    if raw_item is not None:
        try:
            return bytes(raw_item())
        except Exception as exc:  # keep what can be read rather than nothing
            log.warning("delivery.poison_raw_unavailable", error=f"{type(exc).__name__}: {exc}")
    body = getattr(message, "body", b"")
    return body if isinstance(body, bytes) else json.dumps(body, default=repr).encode()
