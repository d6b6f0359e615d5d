"""Writes the acks our transport holds (workers/broker/transport.py, ``QoS``) at least every
``IDLE_ACK_WRITE_INTERVAL`` seconds: while acks keep coming they write those held themselves, but
the last ones before a pause would otherwise wait for the next ack or the channel's close.

The consumer's timer runs the write, as it runs the flush of batched task events (events.py):
it exists with every pool (gevent's timer runs greenlets, the threads pool's is a thread of its
own), where the acks themselves come from task greenlets or pool threads, not from one loop
that could write them on its turn. The held tags are behind a lock in the QoS, so writing from
the timer while tasks ack is safe.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from workers.broker.transport import IDLE_ACK_WRITE_INTERVAL, Transport


class AckWriting(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.connection:Connection",)
    tref: Any = None  # the timer's entry, from the first start on

    def start(self, c: Any) -> None:
        # Runs on every (re)connect; the write looks up the consumer's connection each time.
        if self.tref is None:
            self.tref = c.timer.call_repeatedly(IDLE_ACK_WRITE_INTERVAL, self.write, (c,))

    @staticmethod
    def write(c: Any) -> None:
        # A failed write is logged and its tags kept by the QoS itself; nothing raises here.
        connection = c.connection
        transport = connection.transport if connection is not None else None
        if isinstance(transport, Transport):
            transport.write_held_acks()

    def shutdown(self, c: Any) -> None:
        # The connection's close writes what is still held (Channel.close).
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
