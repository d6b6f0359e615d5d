"""HTTP ingest: events/s through one `postback-relay api` process vs produce_many() in this one.

The API runs as an operator starts it (``python -m workers.cli.main api``), one process, its
access line logged for every request (to a file), against the same Redis as the baseline. The
client is urllib3 with keep-alive connections, --clients threads, bodies encoded beforehand so
the client's JSON work is not measured. Phases, each on an emptied queue:

1. produce_many() in this process, in batches of --batch (the baseline), and
2. the API with arrays of --batch events: events/s; three alternating rounds, the best of each;
3. the API with one event per request: its capacity (requests/s, as fast as the clients go);
4. the API with one event per request at half that capacity, paced on a fixed schedule: the
   latency of each request from its scheduled time (a late start counts), p50/p99/max.

Targets: batched ingest >= 0.5x produce_many; single events p99 <= 20 ms at half capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import urllib3
from common import (
    ROOT,
    add_common_args,
    header,
    machine,
    make_events,
    make_producer,
    new_run_id,
    percentile,
    rate,
    redis_server,
    row,
    run_main,
    templated_toml,
    verdict,
    workspace,
    write_destinations,
)

from config.keys import queue_for
from workers.dev.embedded_redis import free_port

TARGET_RATIO = 0.5
TARGET_P99_MS = 20.0
ROUNDS = 3
TOKEN = "bench-client-token-0123456789abcdef"
CLIENTS = '[[client]]\nname = "bench"\ntoken = { env = "BENCH_API_TOKEN" }\n'


def start_api(workdir: Path, redis_url: str, destinations: Path) -> tuple[Any, str]:
    clients = workdir / "clients.toml"
    clients.write_text(CLIENTS)
    port = free_port()
    env = {
        **os.environ,
        "POSTBACK_RELAY_REDIS_URL": redis_url,
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(destinations),
        "POSTBACK_RELAY_API_CLIENTS_FILE": str(clients),
        "POSTBACK_RELAY_API_MAX_QUEUE_DEPTH": "0",  # no worker drains the queue here
        "POSTBACK_RELAY_LOG_FORMAT": "json",
        "BENCH_API_TOKEN": TOKEN,
    }
    with (workdir / "api.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli.main", "api", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited: {(workdir / 'api.log').read_text()[-2000:]}")
        try:
            if urllib3.request("GET", url + "/readyz", timeout=1).status == 200:
                return proc, url
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the API did not answer /readyz within 30 s")


class Clients:
    """--clients threads, each with its own keep-alive connection, sending prepared bodies."""

    def __init__(self, url: str, threads: int) -> None:
        self.threads = threads
        self.pool = urllib3.HTTPConnectionPool(
            url.removeprefix("http://").split(":")[0],
            int(url.rsplit(":", 1)[1]),
            maxsize=threads,
            block=True,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        self.statuses: dict[int, int] = {}
        self._lock = threading.Lock()

    def send(self, body: bytes) -> None:
        answer = self.pool.urlopen("POST", "/v1/events", body=body, retries=False)
        with self._lock:
            self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1

    def run(self, bodies: list[bytes], schedule: list[float] | None = None) -> list[float]:
        """Send every body, split over the threads; with ``schedule`` (seconds from the start,
        one per body), each at its time. Latencies in seconds, from the scheduled time."""
        latencies: list[float] = []
        start = time.perf_counter() + 0.05

        def worker(index: int) -> None:
            mine = []
            for i in range(index, len(bodies), self.threads):
                due = start + (schedule[i] if schedule else 0.0)
                if schedule:
                    pause = due - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                began = due if schedule else time.perf_counter()
                self.send(bodies[i])
                mine.append(time.perf_counter() - began)
            with self._lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(self.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return latencies


def timed(action: Any) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="events per batched round")
    parser.add_argument("--batch", type=int, default=100, help="events per request / call")
    parser.add_argument("--single", type=int, default=3_000, help="requests of one event")
    parser.add_argument("--clients", type=int, default=4, help="client threads (connections)")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    add_common_args(parser)
    args = parser.parse_args()

    with workspace(args.keep) as workdir, redis_server(workdir, args.appendfsync) as info:
        destinations = write_destinations(workdir, templated_toml("http://127.0.0.1:9"))
        header(
            "api: events/s through `postback-relay api` vs produce_many() (one process each)",
            machine=machine(),
            redis=info.describe(),
            events=f"{args.events:,} installs per batched round, 1 templated destination",
            batch=f"{args.batch} events per request and per produce_many() call",
            client=f"urllib3, {args.clients} threads with keep-alive connections",
        )
        queue = queue_for("templated")
        producer = make_producer(info.url, destinations)
        producer.produce_many(make_events(200, "warm-" + new_run_id()))
        info.client.delete(queue)
        proc, url = start_api(workdir, info.url, destinations)
        try:
            clients = Clients(url, args.clients)
            clients.run([json.dumps(b).encode() for b in make_events(200, "warm-" + new_run_id())])
            info.client.delete(queue)
            many_rate = api_rate = 0.0
            batched_statuses: dict[int, int] = {}
            queued: dict[str, list[int]] = {"produce_many": [], "api": []}
            for _ in range(ROUNDS):  # alternating, the best of each: the machine's load drifts
                events = make_events(args.events, new_run_id())
                batches = [events[i : i + args.batch] for i in range(0, len(events), args.batch)]
                many_s = timed(lambda: [producer.produce_many(b) for b in batches])  # noqa: B023
                queued["produce_many"].append(info.client.llen(queue))
                many_rate = max(many_rate, rate(args.events, many_s))
                info.client.delete(queue)

                events = make_events(args.events, new_run_id())
                bodies = [
                    json.dumps(events[i : i + args.batch]).encode()
                    for i in range(0, len(events), args.batch)
                ]
                clients.statuses.clear()
                api_s = timed(lambda: clients.run(bodies))  # noqa: B023
                queued["api"].append(info.client.llen(queue))
                api_rate = max(api_rate, rate(args.events, api_s))
                for status, n in clients.statuses.items():
                    batched_statuses[status] = batched_statuses.get(status, 0) + n
                info.client.delete(queue)

            singles = [json.dumps(e).encode() for e in make_events(args.single, new_run_id())]
            clients.statuses.clear()
            single_s = timed(lambda: clients.run(singles))
            capacity = rate(args.single, single_s)
            single_statuses = dict(clients.statuses)
            info.client.delete(queue)

            paced_rate = capacity / 2
            count = max(1, int(paced_rate * args.paced_seconds))
            paced = [json.dumps(e).encode() for e in make_events(count, new_run_id())]
            clients.statuses.clear()
            latencies = sorted(clients.run(paced, [i / paced_rate for i in range(count)]))
            paced_statuses = dict(clients.statuses)
            info.client.delete(queue)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(40)

        row(
            f"produce_many(), batches of {args.batch}",
            f"{many_rate:,.0f} events/s",
            f"best of {ROUNDS} rounds of {args.events:,}; on the queue: {queued['produce_many']}",
        )
        row(
            f"API, arrays of {args.batch}",
            f"{api_rate:,.0f} events/s",
            f"best of {ROUNDS} rounds of {args.events:,}; on the queue: {queued['api']}; "
            f"statuses {batched_statuses}",
        )
        ratio = api_rate / many_rate
        row("API batched / produce_many()", f"{ratio:.2f}x")
        row(
            "API, one event per request (capacity)",
            f"{capacity:,.0f} requests/s",
            f"{args.single:,} in {single_s:.2f} s; statuses {single_statuses}",
        )
        p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
        row(
            f"API, one event per request at {paced_rate:,.0f}/s",
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1] * 1000:.1f} ms",
            f"{count:,} requests over {args.paced_seconds:g} s, from their scheduled times; "
            f"statuses {paced_statuses}",
        )
        verdict(
            f"batched >= {TARGET_RATIO}x produce_many(); single p99 <= {TARGET_P99_MS:g} ms at "
            "half capacity",
            ratio >= TARGET_RATIO and p99 <= TARGET_P99_MS,
            f"{ratio:.2f}x, p99 {p99:.1f} ms",
        )


if __name__ == "__main__":
    run_main(main)
