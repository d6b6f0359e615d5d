"""The producer side: the helper backend services call to hand events to postback-relay."""

from producers.produce import Producer, ProduceResult, produce, produce_many
from workers.broker.replication import NotReplicated

__all__ = ["NotReplicated", "ProduceResult", "Producer", "produce", "produce_many"]
