"""kombu's own Redis keys: the names and layouts its Redis transport uses that we read or write.

kombu chooses these names (they cannot carry our ``{prefix}`` hash tag, so any script touching
them together with our keys needs a single-node or Sentinel Redis, which kombu requires anyway).
Nothing outside workers/broker/ spells them. They live on the broker instance, with the delay
set; the table in config/keys.py says which instance holds every other key.
"""

from __future__ import annotations

import json

import redis

# kombu.transport.redis.Channel: unacked_key (delivery tag -> [message, exchange, routing key])
# and unacked_index_key (delivery tag scored by the time it was taken).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


def queue_list(queue: str) -> str:
    """The list kombu's Redis channel pushes a priority-0 message of ``queue`` onto.

    ``Channel._q_for_pri`` appends a separator and the priority for priorities above 0 only;
    every message we write carries priority 0 (workers/broker/wire.py), so it is the name."""
    return queue


def unacked_queues(client: redis.Redis) -> list[str]:
    """The queue of each message a worker holds unacknowledged (kombu's ``unacked`` hash)."""
    queues = []
    for raw in client.hvals(UNACKED):
        try:
            queues.append(json.loads(raw)[2])  # [message, exchange, routing_key]
        except (ValueError, IndexError, TypeError):
            continue
    return queues
