"""Prometheus metrics, kept in Redis so they are global across every worker host.

Workers add to counters and histogram buckets in Redis as they deliver; the `postback-relay
metrics` process reads Redis at scrape time (queue depths, delay sets, dead letters, pauses,
counters, histograms) and serves them on /metrics. Flower has no queue-depth metric; this does.

Workers are not in Redis (kombu keeps no consumer list), so "a queue with no consumer" is read
as a queue that holds messages while no worker has finished one of its messages for a while:
the last-consumed time per queue. The reconciler records each run's end state and its last
successful read of the export, for an alert when it keeps failing or stops running. The alerts
and dashboard over these metrics: deploy/prometheus/alerts.yml, deploy/grafana/.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
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
# How one reconcile request ends (RunReport.state in workers/kinds/redeliver/reconciler.py;
# its "timed_out" is an operator's run giving up between polls, each poll counted already).
RECONCILE_STATES = ("done", "pending", "rate_limited", "unauthorized", "failed", "locked")
# Seconds: one API request, from its first byte read to its answer (workers/api/).
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Statuses of POST /v1/events served from the start (at 0), so rate() has a series to follow.
API_STATUSES = ("202", "400", "401", "403", "413", "422", "429", "500", "503")
# What became of the events of API requests (ApiMetrics in workers/api/metrics.py).
API_ITEM_OUTCOMES = ("accepted", "duplicate", "rejected")
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

    def api(
        self, pipe: Any, counts: dict[str, int], buckets: dict[str, int], seconds: float
    ) -> None:
        """What API requests added since the last call: counters ("requests|202",
        "items|accepted"), latency bucket counts (by bound, as API_BUCKETS or "+Inf"), and
        the latency sum."""
        key = self.keys.metrics_api()
        for field, value in counts.items():
            pipe.hincrby(key, field, value)
        for bound, value in buckets.items():
            pipe.hincrby(key, f"latency|{bound}", value)
        if buckets:
            pipe.hincrbyfloat(key, "latency|sum", seconds)

    def consumed(self, pipe: Any, queues: Iterable[str], now: float) -> None:
        """A worker finished messages of ``queues`` at ``now``."""
        mapping = dict.fromkeys(queues, now)
        if mapping:
            pipe.hset(self.keys.metrics_consumed(), mapping=mapping)

    def reconcile_run(self, pipe: Any, source: str, state: str, now: float) -> None:
        pipe.hincrby(self.keys.metrics_reconcile_runs(), f"{source}|{state}", 1)
        if state == "done":
            pipe.hset(self.keys.metrics_reconcile_done(), source, now)


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
            pipe.hgetall(self.keys.metrics_consumed())
            pipe.hgetall(self.keys.metrics_reconcile_runs())
            pipe.hgetall(self.keys.metrics_reconcile_done())
            pipe.hgetall(self.keys.metrics_api())
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
        yield from self._consumed(queues, next(results))
        yield from self._reconcile(next(results), next(results))
        yield from _api(_decoded(next(results)))

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

    def _consumed(self, queues: list[str], raw: dict[bytes, bytes]) -> Iterator[Any]:
        consumed = _decoded(raw)
        last = GaugeMetricFamily(
            "postback_relay_queue_last_consumed_timestamp_seconds",
            "When a worker last finished a message of the queue (Unix time; 0: never). With "
            "messages waiting, an old time means no worker consumes the queue.",
            labels=["queue"],
        )
        for queue in queues:
            last.add_metric([queue], float(consumed.get(queue, 0)))
        yield last

    def _reconcile(
        self, runs_raw: dict[bytes, bytes], done_raw: dict[bytes, bytes]
    ) -> Iterator[Any]:
        sources = list(self.destinations.reconcile)
        runs_counts, done = _decoded(runs_raw), _decoded(done_raw)
        runs = CounterMetricFamily(
            "postback_relay_reconcile_runs",
            "Reconcile runs (and polls of an export being prepared) by the state they ended in.",
            labels=["source", "state"],
        )
        for source in sources:
            for state in RECONCILE_STATES:
                runs.add_metric([source, state], int(runs_counts.get(f"{source}|{state}", 0)))
        yield runs
        last = GaugeMetricFamily(
            "postback_relay_reconcile_last_success_timestamp_seconds",
            "When a reconcile run last read its source's export (Unix time); absent until one has.",
            labels=["source"],
        )
        for source in sources:
            if source in done:
                last.add_metric([source], float(done[source]))
        yield last


def _api(raw: dict[str, str]) -> Iterator[Any]:
    """The API's families (workers/api/): requests by status, events by outcome, latency."""
    requests = CounterMetricFamily(
        "postback_relay_api_requests", "POST /v1/events requests by status.", labels=["status"]
    )
    statuses = {f.removeprefix("requests|") for f in raw if f.startswith("requests|")}
    for status in sorted(statuses | set(API_STATUSES)):
        requests.add_metric([status], int(raw.get(f"requests|{status}", 0)))
    yield requests
    items = CounterMetricFamily(
        "postback_relay_api_events",
        "Events of API requests: accepted (enqueued now), duplicate (enqueued before), "
        "rejected (invalid, or refused with their request).",
        labels=["outcome"],
    )
    for outcome in API_ITEM_OUTCOMES:
        items.add_metric([outcome], int(raw.get(f"items|{outcome}", 0)))
    yield items
    latency = HistogramMetricFamily(
        "postback_relay_api_request_duration_seconds",
        "POST /v1/events, from the request's arrival to its answer.",
    )
    cumulative, buckets = 0, []
    for bound in [*map(str, API_BUCKETS), "+Inf"]:
        cumulative += int(raw.get(f"latency|{bound}", 0))
        buckets.append((bound, cumulative))
    latency.add_metric([], buckets, float(raw.get("latency|sum", 0.0)))
    yield latency


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def serve_metrics(
    collector: RedisStateCollector,
    port: int,
    address: str = "0.0.0.0",  # noqa: S104 - a scrape endpoint is meant to be reached
) -> Any:
    registry = CollectorRegistry()
    registry.register(collector)
    return start_http_server(port, addr=address, registry=registry)
