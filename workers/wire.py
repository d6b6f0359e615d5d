"""Celery task messages in the exact form kombu's Redis transport puts on a list.

produce() and the delay-set mover write these with one Lua call (dedupe + enqueue atomically,
in one round trip for a whole batch), which kombu's publish API cannot do. The body is built by
Celery's own ``create_task_message`` and serialised by kombu, so the protocol stays theirs; only
the envelope kombu's Redis channel wraps around it is assembled here (see
``kombu.transport.virtual.base.Channel.prepare_message`` / ``basic_publish``).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from celery import Celery
from kombu.serialization import dumps as kombu_dumps

from config.keys import queue_for, task_name_for
from schemas.envelope import DeliveryEnvelope


class TaskMessageEncoder:
    def __init__(self, app: Celery) -> None:
        self._amqp = app.amqp

    def encode_envelope(self, envelope: DeliveryEnvelope, task_id: str) -> str:
        """The delivery task message for ``envelope``, addressed to its kind's queue."""
        return self.encode(
            task_name_for(envelope.kind),
            queue_for(envelope.kind),
            (envelope.to_task_arg(),),
            argsrepr=envelope.task_argsrepr(),
            task_id=task_id,
        )

    def encode(
        self,
        task_name: str,
        queue: str,
        args: tuple[Any, ...],
        argsrepr: str,
        task_id: str | None = None,
    ) -> str:
        task_id = task_id or str(uuid.uuid4())
        headers, properties, body, _ = self._amqp.create_task_message(
            task_id, task_name, args, {}, argsrepr=argsrepr, kwargsrepr="{}"
        )
        content_type, content_encoding, data = kombu_dumps(body, serializer="json")
        raw = data if isinstance(data, bytes) else data.encode(content_encoding)
        message = {
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        }
        return json.dumps(message, separators=(",", ":"))


def decode_task_args(wire: str) -> tuple[dict[str, Any], list[Any]]:
    """Headers and positional args of a wire message (tests, DLQ tooling)."""
    message = json.loads(wire)
    body = json.loads(base64.b64decode(message["body"]))
    return message["headers"], body[0]
