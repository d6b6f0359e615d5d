"""Every piece of code that knows Celery's or kombu's internals: transport, wire, publish, keys."""

from workers.broker.keys import unacked_queues

__all__ = ["unacked_queues"]
