"""Every Redis key and queue name the system uses comes from here, never typed twice.

Which instance holds what. A deployment may run two Redis instances, a broker and a state one
(POSTBACK_RELAY_STATE_REDIS_URL); by default both are one instance and one client. This table
is the one place that decides, per key family:

| key family (RedisKeys method, or kombu's name) | instance | why there                  |
|------------------------------------------------|----------|----------------------------|
| kombu's queue lists ``postback.<kind>``,       | broker   | kombu's own; Celery needs  |
|   unacked, unacked_index, unacked_mutex,       |          |   them together            |
|   bindings, pidbox                             |          |                            |
| ``delayed(queue)``: the delay set              | broker   | messages not yet due: one  |
|                                                |          |   Lua call moves them onto |
|                                                |          |   their queue              |
| ``ledger_drained()``: when a queue went empty  | broker   | read with the queue's LLEN |
| ``state_instance()``: where workers keep state | broker   | read by every producer     |
| ``WORKER_KEY_PREFIXES``: the prefixes workers  | broker   | unprefixed, one per Redis  |
|   use on this database                         |          |   database, as the queues  |
| ``dedupe``, ``ledger``, ``ledger_messages``,   | state    | the durability anchor:     |
|   ``ledger_unpublished``                       |          |   written first; what the  |
|                                                |          |   broker lost goes back    |
| ``dead_letters``, ``dead_letter_index/counts`` | state    |                            |
| ``attempts``, ``unfinished_starts``            | state    |                            |
| ``rate_limit``, ``server_budget``, ``paused``  | state    | the limiter and pauses     |
| ``xmp_*``, ``reconciled``, ``reconcile_*``     | state    | aggregates, reconciler     |
| ``metrics_counters``, ``metrics_histogram``,   | state    |                            |
|   ``metrics_consumed``, ``metrics_api``,       |          |                            |
|   ``metrics_reconcile_runs/done``              |          |                            |
| ``lock(name)``                                 | state    | periodic jobs' locks       |
| ``replication_mark``                           | state    | produce()'s WAIT after a   |
|                                                |          |   duplicate (replication)  |

Every accepted delivery is in the state instance's ledger until it is finished, whether its
message is on a queue or in the delay set; losing the broker's data loses no accepted delivery
(the ledger's sweep publishes it again), at the price of duplicates. A script never spans the
two: with two instances, writers touch the state first, then the broker
(workers/broker/publish.py, workers/stores/ledger.py, workers/stores/deadletter.py,
workers/stores/requeue.py).
"""

from __future__ import annotations

from dataclasses import dataclass

QUEUE_PREFIX = "postback."
# Hash, on the broker: key prefix -> when a worker using it last started. Not prefixed: like the
# queues it is one per database, so a producer with another prefix than the workers' is caught
# (workers/state_instance.py).
WORKER_KEY_PREFIXES = "postback-relay:worker-key-prefixes"


def queue_for(kind: str) -> str:
    """The Celery queue (a Redis list) that carries deliveries of one destination kind."""
    return f"{QUEUE_PREFIX}{kind}"


def task_name_for(kind: str) -> str:
    return f"postback_relay.deliver_{kind}"


@dataclass(frozen=True)
class RedisKeys:
    """Names of the non-broker keys, under one prefix so several deployments can share a Redis.

    The prefix is written as a hash tag, ``{pr}:...``: every key of a deployment hashes to one
    slot, so a Lua script may touch any of them together (kombu's own keys cannot carry it;
    workers/broker/keys.py). Keys of releases before 0.3 were ``pr:...``; migrate_legacy_keys
    (workers/stores/keymigration.py) renames them."""

    prefix: str = "pr"

    @property
    def tag(self) -> str:
        """The prefix as a hash tag: what every key here starts with."""
        return "{" + self.prefix + "}"

    def legacy_prefix(self) -> str:
        """What every key here started with before the hash tag (releases before 0.3)."""
        return f"{self.prefix}:"

    def dedupe(self, delivery_id: str) -> str:
        return f"{self.tag}:dedupe:{delivery_id}"

    def delayed(self, queue: str) -> str:
        """Sorted set of wire messages waiting for ``queue``, scored by due time (broker)."""
        return f"{self.tag}:delayed:{queue}"

    def dead_letters(self) -> str:
        """Hash: delivery id -> dead-letter entry (JSON)."""
        return f"{self.tag}:dlq:entries"

    def dead_letter_index(self) -> str:
        """Sorted set: delivery id scored by dead-letter time, for listing and --since."""
        return f"{self.tag}:dlq:index"

    def attempts(self) -> str:
        """Stream of attempt records (AppMetrica postback-export field names)."""
        return f"{self.tag}:attempts"

    def unfinished_starts(self, delivery_id: str, attempt: int) -> str:
        """Counter of starts of one attempt that never finished (its worker died)."""
        return f"{self.tag}:started:{delivery_id}:{attempt}"

    def dead_letter_counts(self) -> str:
        """Hash: destination -> number of dead-letter entries (metrics, health)."""
        return f"{self.tag}:dlq:counts"

    def metrics_counters(self) -> str:
        """Hash: "destination|outcome" -> count, for the Prometheus exporter."""
        return f"{self.tag}:metrics:counters"

    def metrics_histogram(self, name: str, destination: str) -> str:
        """Hash: bucket upper bound (or "sum"/"count") -> value."""
        return f"{self.tag}:metrics:{name}:{destination}"

    def metrics_api(self) -> str:
        """Hash: the API's counters ("requests|<status>", "items|<outcome>") and its latency
        histogram ("latency|<bucket bound>", "latency|sum"), summed over every API process."""
        return f"{self.tag}:metrics:api"

    def metrics_consumed(self) -> str:
        """Hash: queue -> when a worker last finished a message of it (epoch seconds)."""
        return f"{self.tag}:metrics:consumed"

    def metrics_reconcile_runs(self) -> str:
        """Hash: "source|state" -> reconcile runs that ended in that state."""
        return f"{self.tag}:metrics:reconcile:runs"

    def metrics_reconcile_done(self) -> str:
        """Hash: source -> when a reconcile run of it last read its export (epoch seconds)."""
        return f"{self.tag}:metrics:reconcile:done"

    def rate_limit(self, destination: str) -> str:
        return f"{self.tag}:ratelimit:{destination}"

    def server_budget(self, destination: str) -> str:
        """What the partner says is left of its window; expires at the partner's reset time."""
        return f"{self.tag}:budget:{destination}"

    def paused(self, destination: str) -> str:
        return f"{self.tag}:paused:{destination}"

    def xmp_seen(self, destination: str, event_id: str) -> str:
        """Set once an event was counted into a destination's totals (at-least-once delivery)."""
        return f"{self.tag}:xmp:{destination}:seen:{event_id}"

    def xmp_record(self, destination: str, request_id: str) -> str:
        """Hash: dims, count, revenue/value as units + micros, version of one XMP record."""
        return f"{self.tag}:xmp:{destination}:rec:{request_id}"

    def xmp_users(self, destination: str, request_id: str) -> str:
        """HyperLogLog of the record's device ids: event_unique_users."""
        return f"{self.tag}:xmp:{destination}:users:{request_id}"

    def xmp_dirty(self, destination: str) -> str:
        """Sorted set of request ids changed since their last successful send."""
        return f"{self.tag}:xmp:{destination}:dirty"

    def reconciled(self, source: str, identity: str) -> str:
        """Claimed once a postback was enqueued for redelivery: never twice, ever."""
        return f"{self.tag}:reconcile:{source}:done:{identity}"

    def reconcile_checkpoint(self, source: str) -> str:
        return f"{self.tag}:reconcile:{source}:checkpoint"

    def reconcile_pending(self, source: str) -> str:
        """The window of an export AppMetrica is still preparing (polls repeat it exactly)."""
        return f"{self.tag}:reconcile:{source}:pending"

    def ledger(self) -> str:
        """Sorted set: delivery id scored by its progress deadline (workers/stores/ledger.py)."""
        return f"{self.tag}:ledger"

    def ledger_messages(self) -> str:
        """Hash: delivery id -> "queue\\n" + its latest wire message, to publish it again."""
        return f"{self.tag}:ledger:messages"

    def ledger_unpublished(self) -> str:
        """Set: delivery ids the ledger holds whose message never reached the broker (a push
        that failed with separate instances); published again at once when it answers."""
        return f"{self.tag}:ledger:unpublished"

    def state_instance(self) -> str:
        """String, on the broker: where the workers keep their state (workers/state_instance.py)."""
        return f"{self.tag}:state-instance"

    def ledger_drained(self) -> str:
        """Hash: queue -> when the ledger's sweep first saw it empty (gone once it is not);
        on the broker instance, beside the queues."""
        return f"{self.tag}:ledger:drained"

    def replication_mark(self) -> str:
        """Written by a producer that waits for replicas after a duplicate: its write carries
        the WAIT (workers/broker/replication.py)."""
        return f"{self.tag}:replication-mark"

    def lock(self, name: str) -> str:
        return f"{self.tag}:lock:{name}"
