"""The requeue after a retry or a deferral: the envelope back on its queue, or in the delay set.

The new message and the ledger's record of it go in one transaction, so the ledger always
holds the message that would be published again (workers/stores/ledger.py). With a broker
instance of its own (config/keys.py), the ledger's record goes first, on the state instance,
then the message, on the broker: whichever fails, the ledger holds what to publish again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from config.keys import queue_for
from schemas.envelope import DeliveryEnvelope
from workers.broker.publish import publish
from workers.broker.wire import TaskMessageEncoder
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger


class Requeuer:
    """Puts an envelope back for later: on the queue now, or in the delay set until it is due."""

    def __init__(
        self,
        client: redis.Redis,
        delays: DelaySet,
        encoder: TaskMessageEncoder,
        ledger: DeliveryLedger,
    ) -> None:
        """``client``: the broker instance (the delay set's); the ledger has its own."""
        self.redis = client
        self.delays = delays
        self.encoder = encoder
        self.ledger = ledger

    def later(self, envelope: DeliveryEnvelope, delay: float, now: float | None = None) -> None:
        self.later_many([(envelope, delay)], now)

    def later_many(
        self, items: Sequence[tuple[DeliveryEnvelope, float]], now: float | None = None
    ) -> None:
        """Each envelope back after its delay (0: on its queue now), all in one transaction
        (a batch's retries and deferrals of one completion wave)."""
        if not items:
            return
        now = time.time() if now is None else now
        parked = []
        for envelope, delay in items:
            wire = self.encoder.encode_envelope(
                envelope, task_id=f"{envelope.delivery_id}.{envelope.attempt}"
            )
            due = now + max(0.0, delay)
            parked.append((envelope.delivery_id, queue_for(envelope.kind), wire, delay, due))
        if self.ledger.redis is not self.redis:
            with self.ledger.redis.pipeline(transaction=True) as pipe:
                for delivery_id, queue, wire, _, due in parked:
                    self.ledger.park(pipe, delivery_id, queue, wire, due)
                pipe.execute()
        with self.redis.pipeline(transaction=True) as pipe:
            for delivery_id, queue, wire, delay, due in parked:
                if delay <= 0:
                    publish(pipe, queue, wire)
                else:
                    self.delays.schedule(queue, wire, due, pipe=pipe)
                if self.ledger.redis is self.redis:
                    self.ledger.park(pipe, delivery_id, queue, wire, due)
            pipe.execute()
