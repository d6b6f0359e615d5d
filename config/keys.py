"""Every Redis key and queue name the system uses comes from here, never typed twice."""

from __future__ import annotations

from dataclasses import dataclass

QUEUE_PREFIX = "postback."


def queue_for(kind: str) -> str:
    """The Celery queue (a Redis list) that carries deliveries of one destination kind."""
    return f"{QUEUE_PREFIX}{kind}"


def task_name_for(kind: str) -> str:
    return f"postback_relay.deliver_{kind}"


@dataclass(frozen=True)
class RedisKeys:
    """Names of the non-broker keys, under one prefix so several deployments can share a Redis."""

    prefix: str = "pr"

    def dedupe(self, delivery_id: str) -> str:
        return f"{self.prefix}:dedupe:{delivery_id}"

    def delayed(self, queue: str) -> str:
        """Sorted set of wire messages waiting for ``queue``, scored by due time."""
        return f"{self.prefix}:delayed:{queue}"

    def dead_letters(self) -> str:
        """Hash: delivery id -> dead-letter entry (JSON)."""
        return f"{self.prefix}:dlq:entries"

    def dead_letter_index(self) -> str:
        """Sorted set: delivery id scored by dead-letter time, for listing and --since."""
        return f"{self.prefix}:dlq:index"

    def attempts(self) -> str:
        """Stream of attempt records (AppMetrica postback-export field names)."""
        return f"{self.prefix}:attempts"

    def unfinished_starts(self, delivery_id: str, attempt: int) -> str:
        """Counter of starts of one attempt that never finished (its worker died)."""
        return f"{self.prefix}:started:{delivery_id}:{attempt}"

    def dead_letter_counts(self) -> str:
        """Hash: destination -> number of dead-letter entries (metrics, health)."""
        return f"{self.prefix}:dlq:counts"

    def metrics_counters(self) -> str:
        """Hash: "destination|outcome" -> count, for the Prometheus exporter."""
        return f"{self.prefix}:metrics:counters"

    def metrics_histogram(self, name: str, destination: str) -> str:
        """Hash: bucket upper bound (or "sum"/"count") -> value."""
        return f"{self.prefix}:metrics:{name}:{destination}"

    def rate_limit(self, destination: str) -> str:
        return f"{self.prefix}:ratelimit:{destination}"

    def server_budget(self, destination: str) -> str:
        """What the partner says is left of its window; expires at the partner's reset time."""
        return f"{self.prefix}:budget:{destination}"

    def paused(self, destination: str) -> str:
        return f"{self.prefix}:paused:{destination}"

    def xmp_seen(self, destination: str, event_id: str) -> str:
        """Set once an event was counted into a destination's totals (at-least-once delivery)."""
        return f"{self.prefix}:xmp:{destination}:seen:{event_id}"

    def xmp_record(self, destination: str, request_id: str) -> str:
        """Hash: dims, count, revenue/value as units + micros, version of one XMP record."""
        return f"{self.prefix}:xmp:{destination}:rec:{request_id}"

    def xmp_users(self, destination: str, request_id: str) -> str:
        """HyperLogLog of the record's device ids: event_unique_users."""
        return f"{self.prefix}:xmp:{destination}:users:{request_id}"

    def xmp_dirty(self, destination: str) -> str:
        """Sorted set of request ids changed since their last successful send."""
        return f"{self.prefix}:xmp:{destination}:dirty"

    def reconciled(self, source: str, identity: str) -> str:
        """Claimed once a postback was enqueued for redelivery: never twice, ever."""
        return f"{self.prefix}:reconcile:{source}:done:{identity}"

    def reconcile_checkpoint(self, source: str) -> str:
        return f"{self.prefix}:reconcile:{source}:checkpoint"

    def reconcile_pending(self, source: str) -> str:
        """The window of an export AppMetrica is still preparing (polls repeat it exactly)."""
        return f"{self.prefix}:reconcile:{source}:pending"

    def ledger(self) -> str:
        """Sorted set: delivery id scored by its progress deadline (workers/stores/ledger.py)."""
        return f"{self.prefix}:ledger"

    def ledger_messages(self) -> str:
        """Hash: delivery id -> "queue\\n" + its latest wire message, to publish it again."""
        return f"{self.prefix}:ledger:messages"

    def ledger_drained(self) -> str:
        """Hash: queue -> when the ledger's sweep first saw it empty (gone once it is not)."""
        return f"{self.prefix}:ledger:drained"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"
