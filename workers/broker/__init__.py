"""Every piece of code that knows Celery's or kombu's internals: transport, wire, publish, keys."""

from workers.broker.keys import queue_list, unacked_queues

__all__ = ["queue_list", "unacked_queues"]
