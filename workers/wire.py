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
from celery.utils.nodenames import anon_nodename

from config.keys import queue_for, task_name_for
from schemas.envelope import DeliveryEnvelope


class TaskMessageEncoder:
    def __init__(self, app: Celery) -> None:
        self._amqp = app.amqp
        # The "origin" header (who sent the task); Celery would work it out for every message.
        self._origin = anon_nodename()

    def encode_envelope(self, envelope: DeliveryEnvelope, task_id: str) -> str:
        """The delivery task message for ``envelope``, addressed to its kind's queue.

        The envelope is serialised once, by pydantic, straight into Celery's body
        ``[args, kwargs, embed]`` (produce_many's hot path: no dict round trip)."""
        return self._wire(
            task_name_for(envelope.kind),
            queue_for(envelope.kind),
            "[" + envelope.model_dump_json() + "]",
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
        return self._wire(task_name, queue, json.dumps(list(args)), argsrepr, task_id)

    def _wire(
        self, task_name: str, queue: str, args_json: str, argsrepr: str, task_id: str | None
    ) -> str:
        task_id = task_id or str(uuid.uuid4())
        # Celery builds the protocol-2 headers and the embed part; the args are already JSON.
        headers, properties, body, _ = self._amqp.create_task_message(
            task_id, task_name, (), {}, argsrepr=argsrepr, kwargsrepr="{}", origin=self._origin
        )
        _, kwargs, embed = body
        raw = f"[{args_json},{json.dumps(kwargs)},{json.dumps(embed)}]".encode()
        message = {
            "body": base64.b64encode(raw).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
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
