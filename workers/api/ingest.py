"""What one POST /v1/events does, as plain code (app.py only maps it onto HTTP): check the
client's apps, the queues' depth, then validate and enqueue through Producer.produce_many, the
Python helper's own code (validation, routing, dedupe window, idempotency; one Redis round trip
per batch of up to MAX_BATCH deliveries)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from config.api_clients import ApiClient
from config.keys import queue_for
from producers.produce import Producer
from schemas.errors import InvalidEvent
from schemas.event import ConversionEvent
from workers.broker.keys import queue_list
from workers.broker.replication import NotReplicated

# Seconds a client is told to wait (Retry-After) when Redis does not answer, and when a queue
# is deeper than POSTBACK_RELAY_API_MAX_QUEUE_DEPTH (workers need a while to drain it).
RETRY_AFTER_UNAVAILABLE = 1
RETRY_AFTER_BACKPRESSURE = 5
# Seconds a read of the queues' depth serves for: backpressure needs no exact figure, and a
# request should not pay a second round trip for it.
DEPTH_MAX_AGE = 0.5


@dataclass
class Answer:
    """An HTTP answer, and what became of the request's events (for metrics and the log)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)


def problem(status: int, message: str, retry_after: int | None = None, **extra: Any) -> Answer:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return Answer(status, {"error": message, **extra}, headers)


class Ingest:
    def __init__(self, producer: Producer, broker: redis.Redis) -> None:
        self.producer = producer
        self.settings = producer.settings
        self.broker = broker
        kinds = sorted({dest.kind for dest in producer.destinations})
        self.queues = [queue_list(queue_for(kind)) for kind in kinds]
        self._depth_lock = threading.Lock()
        self._depth_read = -DEPTH_MAX_AGE
        self._too_deep: str | None = None

    def parse_body(self, body: bytes) -> tuple[list[Any] | None, Answer | None]:
        """The items of a body (one event or an array of them), or the answer refusing it."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return None, problem(400, f"the body is not JSON ({exc})")
        if isinstance(data, dict):
            return [data], None
        if not isinstance(data, list):
            return None, problem(400, "the body must be one event (an object) or an array")
        if not data:
            return None, problem(400, "the array holds no event")
        if len(data) > self.settings.api_max_items:
            return None, problem(
                413,
                f"{len(data)} events in one request; at most {self.settings.api_max_items}"
                " (POSTBACK_RELAY_API_MAX_ITEMS): send them in several requests",
            )
        return data, None

    def queue_too_deep(self) -> str | None:
        """The deepest queue's name when it holds more messages than the bound allows."""
        bound = self.settings.api_max_queue_depth
        if not bound or not self.queues:
            return None
        with self._depth_lock:
            now = time.monotonic()
            if now - self._depth_read > DEPTH_MAX_AGE:
                with self.broker.pipeline(transaction=False) as pipe:
                    for queue in self.queues:
                        pipe.llen(queue)
                    depths = pipe.execute()
                deepest = max(range(len(depths)), key=lambda i: depths[i])
                self._too_deep = self.queues[deepest] if depths[deepest] > bound else None
                self._depth_read = now
            return self._too_deep

    def handle(self, client: ApiClient, items: list[Any]) -> Answer:
        """Validate every item, refuse the request whole when one is for an app the client may
        not send for, apply backpressure, and enqueue the valid ones."""
        parsed: list[ConversionEvent | InvalidEvent] = []
        for item in items:
            try:
                parsed.append(ConversionEvent.parse(item))
            except InvalidEvent as exc:
                parsed.append(exc)
        foreign = [
            i
            for i, p in enumerate(parsed)
            if isinstance(p, ConversionEvent) and not client.allows(p.app_id)
        ]
        if foreign:
            answer = problem(
                403,
                f"client {client.name!r} may not send events of these apps; nothing of the "
                "request was enqueued",
                items=[{"index": i, "app_id": parsed[i].app_id} for i in foreign],  # type: ignore[union-attr]
            )
            answer.outcomes["rejected"] = len(items)
            return answer
        try:
            deep = self.queue_too_deep()
            if deep is not None:
                answer = problem(
                    503,
                    f"queue {deep} holds more than {self.settings.api_max_queue_depth} "
                    "messages; nothing was enqueued, retry later",
                    RETRY_AFTER_BACKPRESSURE,
                )
                answer.outcomes["rejected"] = len(items)
                return answer
            valid = [p for p in parsed if isinstance(p, ConversionEvent)]
            produced = iter(self.producer.produce_many(valid) if valid else [])
        except (redis.RedisError, NotReplicated) as exc:
            answer = problem(
                503,
                f"Redis did not take the events ({type(exc).__name__}); retry with the same "
                "event_id values: what was enqueued comes back as duplicates",
                RETRY_AFTER_UNAVAILABLE,
            )
            answer.outcomes["rejected"] = len(items)
            return answer
        return _results(items, parsed, produced)


def _results(items: list[Any], parsed: list[Any], produced: Any) -> Answer:
    results: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    for index, (item, p) in enumerate(zip(items, parsed, strict=True)):
        if isinstance(p, InvalidEvent):
            raw_id = item.get("event_id") if isinstance(item, dict) else None
            results.append({
                "index": index,
                "event_id": raw_id if isinstance(raw_id, str) else None,
                "status": "invalid",
                "error": str(p),
                "errors": p.errors,
            })  # fmt: skip
            outcomes["rejected"] += 1
            continue
        result = next(produced)
        status = "duplicate" if result.duplicates and not result.accepted else "accepted"
        results.append({
            "index": index,
            "event_id": result.event_id,
            "status": status,
            "delivery_ids": result.accepted,
            "duplicates": result.duplicates,
        })  # fmt: skip
        outcomes[status] += 1
    body = {
        "accepted": outcomes["accepted"],
        "duplicates": outcomes["duplicate"],
        "invalid": outcomes["rejected"],
        "results": results,
    }
    return Answer(422 if outcomes["rejected"] else 202, body, outcomes=outcomes)
