"""Prometheus metrics, kept in Redis so they are global across every worker host.

Workers add to counters and histogram buckets in Redis as they deliver; the `postback-relay
metrics` process reads Redis at scrape time (queue depths, delay sets, dead letters, pauses,
counters, histograms) and serves them on /metrics. Flower has no queue-depth metric; this does.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from config.destinations import Destinations
from config.keys import RedisKeys, queue_for
from schemas.outcomes import DELIVERY_STATUSES
from workers.broker.keys import queue_list

# Seconds. End-to-end latency includes retries, hence the long tail.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 86400)
OUTCOMES = DELIVERY_STATUSES
HISTOGRAMS = {
    "delivery_latency": "From produce() to the partner's 2xx, retries included.",
    "http_duration": "One HTTP attempt, from sending to the first body bytes read.",
}


class MetricsRecorder:
    def __init__(self, keys: RedisKeys) -> None:
        self.keys = keys

    def count(self, pipe: Any, destination: str, outcome: str) -> None:
        pipe.hincrby(self.keys.metrics_counters(), f"{destination}|{outcome}", 1)

    def observe(self, pipe: Any, name: str, destination: str, seconds: float) -> None:
        key = self.keys.metrics_histogram(name, destination)
        index = bisect.bisect_left(BUCKETS, seconds)
        pipe.hincrby(key, str(BUCKETS[index]) if index < len(BUCKETS) else "+Inf", 1)
        pipe.hincrbyfloat(key, "sum", seconds)


class RedisStateCollector(Collector):
    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        destinations: Destinations,
        kinds: tuple[str, ...],
        broker: redis.Redis | None = None,
    ) -> None:
        """``client``: the state instance; ``broker``: the queues' (and delay sets'), when it
        is another one."""
        self.redis = client
        self.broker = client if broker is None else broker
        self.keys = keys
        self.destinations = destinations
        self.kinds = kinds

    def collect(self) -> Iterator[Any]:
        names = list(self.destinations.by_name)
        queues = [queue_for(k) for k in self.kinds]
        with self.broker.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue_list(queue))
                pipe.zcard(self.keys.delayed(queue))
            depths = iter(pipe.execute())
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.ledger())
            pipe.hgetall(self.keys.dead_letter_counts())
            pipe.hgetall(self.keys.metrics_counters())
            for name in names:
                pipe.exists(self.keys.paused(name))
                for hist in HISTOGRAMS:
                    pipe.hgetall(self.keys.metrics_histogram(hist, name))
            results = iter(pipe.execute())

        depth = GaugeMetricFamily(
            "postback_relay_queue_depth",
            "Messages waiting on a queue (each carries up to POSTBACK_RELAY_BATCH_SIZE "
            "deliveries).",
            labels=["queue"],
        )
        delayed = GaugeMetricFamily(
            "postback_relay_delayed", "Messages parked in the delay set.", labels=["queue"]
        )
        for queue in queues:
            depth.add_metric([queue], next(depths))
            delayed.add_metric([queue], next(depths))
        yield depth
        yield delayed
        yield GaugeMetricFamily(
            "postback_relay_deliveries_outstanding",
            "Deliveries accepted and not yet settled (queued, parked or in flight), counted "
            "in the ledger: deliveries, not messages.",
            value=next(results),
        )

        dead = GaugeMetricFamily(
            "postback_relay_dead_letters",
            "Entries in the dead-letter store.",
            labels=["destination"],
        )
        dead_counts = {k.decode(): int(v) for k, v in next(results).items()}
        for name in sorted(set(names) | set(dead_counts)):
            dead.add_metric([name], dead_counts.get(name, 0))
        yield dead

        deliveries = CounterMetricFamily(
            "postback_relay_deliveries",
            "Delivery task outcomes.",
            labels=["destination", "outcome"],
        )
        counters = {k.decode(): int(v) for k, v in next(results).items()}
        for name in names:
            for outcome in OUTCOMES:
                deliveries.add_metric([name, outcome], counters.get(f"{name}|{outcome}", 0))
        yield deliveries

        paused = GaugeMetricFamily(
            "postback_relay_destination_paused",
            "1 while a destination is paused.",
            labels=["destination"],
        )
        histograms = {
            hist: HistogramMetricFamily(
                f"postback_relay_{hist}_seconds", help_text, labels=["destination"]
            )
            for hist, help_text in HISTOGRAMS.items()
        }
        for name in names:
            paused.add_metric([name], int(next(results)))
            for hist in HISTOGRAMS:
                raw = {k.decode(): v.decode() for k, v in next(results).items()}
                cumulative, buckets = 0, []
                for bound in [*map(str, BUCKETS), "+Inf"]:
                    cumulative += int(raw.get(bound, 0))
                    buckets.append((bound, cumulative))
                histograms[hist].add_metric([name], buckets, float(raw.get("sum", 0.0)))
        yield paused
        yield from histograms.values()


def serve_metrics(
    collector: RedisStateCollector,
    port: int,
    address: str = "0.0.0.0",  # noqa: S104 - a scrape endpoint is meant to be reached
) -> Any:
    registry = CollectorRegistry()
    registry.register(collector)
    return start_http_server(port, addr=address, registry=registry)
