"""The API's request metrics, summed in this process and added to Redis once a second, where
`postback-relay metrics` reads them at scrape time with every other metric (workers/metrics.py):
one endpoint for the whole system, summed over every API process, and no Redis write per
request (a request's own round trip is its batch's, nothing else)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

import redis
import structlog

from workers.metrics import API_BUCKETS, MetricsRecorder

FLUSH_INTERVAL = 1.0
log = structlog.get_logger("postback_relay.api")


class ApiMetrics:
    def __init__(
        self, client: redis.Redis, recorder: MetricsRecorder, interval: float = FLUSH_INTERVAL
    ) -> None:
        self.redis = client
        self.recorder = recorder
        self.interval = interval
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._buckets: Counter[str] = Counter()
        self._seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, status: int, outcomes: Counter[str], seconds: float) -> None:
        """One answered request: its status, its events' outcomes, its duration."""
        index = bisect.bisect_left(API_BUCKETS, seconds)
        bound = str(API_BUCKETS[index]) if index < len(API_BUCKETS) else "+Inf"
        with self._lock:
            self._counts[f"requests|{status}"] += 1
            for outcome, count in outcomes.items():
                self._counts[f"items|{outcome}"] += count
            self._buckets[bound] += 1
            self._seconds += seconds

    def flush(self) -> None:
        """Add what was recorded since the last flush to Redis; kept for the next one when
        Redis does not answer."""
        with self._lock:
            counts, buckets, seconds = self._counts, self._buckets, self._seconds
            self._counts, self._buckets, self._seconds = Counter(), Counter(), 0.0
        if not counts:
            return
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                self.recorder.api(pipe, dict(counts), dict(buckets), seconds)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("api.metrics_not_flushed", error=str(exc))
            with self._lock:
                self._counts.update(counts)
                self._buckets.update(buckets)
                self._seconds += seconds

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="api-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the flusher and flush what is left (at shutdown, after in-flight requests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
