"""The requeue after a retry or a deferral: the envelope back on its queue, or in the delay set.

The new message and the ledger's record of it go in one transaction, so the ledger always
holds the message that would be published again (workers/stores/ledger.py). With a broker
instance of its own (config/keys.py), the ledger's record goes first, on the state instance,
then the message, on the broker: whichever fails, the ledger holds what to publish again.
"""

from __future__ import annotations

import time

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
        queue = queue_for(envelope.kind)
        wire = self.encoder.encode_envelope(
            envelope, task_id=f"{envelope.delivery_id}.{envelope.attempt}"
        )
        due = (time.time() if now is None else now) + max(0.0, delay)
        if self.ledger.redis is not self.redis:
            with self.ledger.redis.pipeline(transaction=True) as pipe:
                self.ledger.park(pipe, envelope.delivery_id, queue, wire, due)
                pipe.execute()
        with self.redis.pipeline(transaction=True) as pipe:
            if delay <= 0:
                publish(pipe, queue, wire)
            else:
                self.delays.schedule(queue, wire, due, pipe=pipe)
            if self.ledger.redis is self.redis:
                self.ledger.park(pipe, envelope.delivery_id, queue, wire, due)
            pipe.execute()
