"""Celery task messages in the exact form kombu's Redis transport puts on a list.

produce() and the delay-set mover write these with one Lua call (dedupe + enqueue atomically,
in one round trip for a whole batch), which kombu's publish API cannot do. The headers and
body tail come from Celery's own ``create_task_message`` and the JSON from kombu's layout, so
the protocol stays theirs; only the envelope kombu's Redis channel wraps around it is assembled
here (see ``kombu.transport.virtual.base.Channel.prepare_message`` / ``basic_publish``).

Celery's message for a task differs from one call to the next only in the task id, the argsrepr,
the body and kombu's delivery tag, so each task name's message is laid out once, as JSON text
with four slots, and every message after that is the slots filled in (produce_many's hot path).

A delivery task's argument is one envelope (``encode_envelope``: every release's form, and
what the ledger republishes) or a list of one kind's envelopes (``encode_batch``).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename

from config.keys import queue_for, task_name_for
from schemas.envelope import DeliveryEnvelope

_SLOTS = ("task_id", "argsrepr", "body", "delivery_tag")
_SLOT = re.compile(r'"\\u0000(' + "|".join(_SLOTS) + r')\\u0000"')


class _MessageLayout:
    """One task's wire message as JSON text with slots; ``fill`` puts the values in."""

    def __init__(self, amqp: Any, task_name: str, queue: str, origin: str) -> None:
        mark = {slot: f"\x00{slot}\x00" for slot in _SLOTS}
        headers, properties, body, _ = amqp.create_task_message(
            mark["task_id"], task_name, (), {}, argsrepr=mark["argsrepr"], kwargsrepr="{}",
            origin=origin,
        )  # fmt: skip
        _, kwargs, embed = body
        # The body is [args, kwargs, embed]; args come per message, the rest is fixed.
        self.body_tail = f",{json.dumps(kwargs)},{json.dumps(embed)}]".encode()
        message = {
            "body": mark["body"],
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": mark["delivery_tag"],
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        }
        pieces = _SLOT.split(json.dumps(message, separators=(",", ":")))
        self.literals = pieces[0::2]
        self.slots = pieces[1::2]
        if sorted(set(self.slots)) != sorted(_SLOTS) or "\\u0000" in "".join(self.literals):
            # A Celery whose message carries the task id somewhere new must not be half-filled.
            raise RuntimeError(f"unexpected Celery task message layout: {self.slots}")

    def fill(self, task_id: str, argsrepr: str, args_json: str) -> str:
        raw = b"[" + args_json.encode() + self.body_tail
        values = {
            "task_id": json.dumps(task_id),
            "argsrepr": json.dumps(argsrepr),
            "body": '"' + base64.b64encode(raw).decode("ascii") + '"',
            "delivery_tag": '"' + str(uuid.uuid4()) + '"',
        }
        out = [self.literals[0]]
        for slot, literal in zip(self.slots, self.literals[1:], strict=True):
            out += (values[slot], literal)
        return "".join(out)


class TaskMessageEncoder:
    def __init__(self, app: Celery) -> None:
        self._amqp = app.amqp
        # The "origin" header (who sent the task); Celery would work it out for every message.
        self._origin = anon_nodename()
        self._layouts: dict[tuple[str, str], _MessageLayout] = {}

    def encode_envelope(
        self, envelope: DeliveryEnvelope, task_id: str, envelope_json: str | None = None
    ) -> str:
        """The delivery task message for ``envelope`` alone, addressed to its kind's queue:
        the one form of every release before batches, and what the ledger republishes.

        The envelope is serialised once, by pydantic, straight into Celery's body
        ``[args, kwargs, embed]`` (no dict round trip); ``envelope_json``: already done."""
        return self._wire(
            task_name_for(envelope.kind),
            queue_for(envelope.kind),
            "[" + (envelope_json or envelope.model_dump_json()) + "]",
            argsrepr=envelope.task_argsrepr(),
            task_id=task_id,
        )

    def encode_batch(
        self,
        kind: str,
        envelope_jsons: Sequence[str],
        destinations: Sequence[str],
        task_id: str | None = None,
    ) -> str:
        """One task message carrying several deliveries of ``kind``: args ``[[env, ...]]``,
        each envelope as JSON already (the producer serialised it once for its own message
        too; the delay mover has it from the message it replaces)."""
        return self._wire(
            task_name_for(kind),
            queue_for(kind),
            "[[" + ",".join(envelope_jsons) + "]]",
            argsrepr=batch_argsrepr(destinations),
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
        layout = self._layouts.get((task_name, queue))
        if layout is None:
            layout = _MessageLayout(self._amqp, task_name, queue, self._origin)
            self._layouts[(task_name, queue)] = layout
        return layout.fill(task_id or str(uuid.uuid4()), argsrepr, args_json)


def batch_argsrepr(destinations: Iterable[str]) -> str:
    """What Flower shows of a batch task: the count and the destinations, never an event's
    fields (device ids, URLs): ``(12 deliveries: network-installs×7, analytics×5)``."""  # noqa: RUF002
    counts = Counter(destinations)
    parts = ", ".join(f"{name}×{n}" for name, n in counts.most_common())  # noqa: RUF001
    total = sum(counts.values())
    return f"({total} deliver{'y' if total == 1 else 'ies'}: {parts})"


def decode_task_args(wire: str) -> tuple[dict[str, Any], list[Any]]:
    """Headers and positional args of a wire message (tests, DLQ tooling)."""
    message = json.loads(wire)
    body = json.loads(base64.b64decode(message["body"]))
    return message["headers"], body[0]
