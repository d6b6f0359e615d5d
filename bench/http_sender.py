"""Deliveries' HTTP sender: the urllib3 one against the requests path it replaced, same run.

One process, one keep-alive connection, sends one after another to bench/receiver.py (its own
process, answering at once). Three ways, each the whole step a delivery takes (send, bounded
read, masking, the adapter's classification), interleaved in rounds so a neighbour's load
falls on all of them alike:
  - requests: the 0.3.0 sender (StartupEnvSession, ``stream=True``, ``raw.read`` bounded);
  - urllib3 sender: ``workers.delivery.sender.Sender`` over ``HttpClient``;
  - bare urllib3: ``PoolManager.request`` with the same timeouts, the whole body preloaded,
    nothing else (the floor any sender on urllib3 pays).
Prints requests/s and process CPU per request for each (the receiver's CPU is not counted), and
the ratio of the requests path to the new sender. No target: issue 14 asks for the leaner one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from types import SimpleNamespace

import urllib3
from common import Receiver, header, machine, row, run_main, workspace
from requests.exceptions import RequestException

from schemas.outcomes import Outcome
from workers.delivery.client import http_client
from workers.delivery.http import HttpAnswer, HttpFailure, StartupEnvSession, http_session
from workers.delivery.sender import Sender
from workers.kinds.base import RESPONSE_READ_BYTES, DestinationAdapter, OutgoingRequest
from workers.logging import mask_secrets


class Probe(DestinationAdapter):
    """The base class's classification on a destination with one secret (masking runs)."""

    kind = "probe"

    def __init__(self) -> None:
        super().__init__(
            SimpleNamespace(  # type: ignore[arg-type]
                timeout=SimpleNamespace(connect=5.0, read=10.0),
                secrets_to_mask=lambda: ["bench-secret-value"],
            )
        )

    def build_request(self, envelope: object) -> OutgoingRequest:
        raise NotImplementedError


def requests_send(
    session: StartupEnvSession, adapter: DestinationAdapter, request: OutgoingRequest
) -> tuple[Outcome, float]:
    """The 0.3.0 Sender.send, line for line (its answer handed to today's classify)."""
    timeout = adapter.destination.timeout
    started = time.perf_counter()
    try:
        with session.request(
            request.method,
            request.url,
            headers=request.headers,
            data=request.body,
            timeout=urllib3.Timeout(  # type: ignore[arg-type]
                connect=timeout.connect, read=timeout.read, total=timeout.connect + timeout.read
            ),
            stream=True,
            allow_redirects=request.follow_redirects,
        ) as response:
            excerpt = response.raw.read(RESPONSE_READ_BYTES, decode_content=True)
            text = mask_secrets(
                excerpt.decode(response.encoding or "utf-8", errors="replace"),
                adapter.destination.secrets_to_mask(),
            )
            answer = HttpAnswer.of(response.status_code, response.headers)
            outcome = adapter.classify(answer, text)
    except RequestException as exc:
        outcome = adapter.classify_error(HttpFailure("request", type(exc).__name__))
    return outcome, time.perf_counter() - started


def measure(send: Callable[[], object], count: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``count`` sends."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        send()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=6_000, help="sends per way")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--keep", action="store_true", help="keep the receiver's log")
    args = parser.parse_args()
    per_round = max(1, args.requests // args.rounds)

    with workspace(args.keep) as workdir:
        receiver = Receiver(workdir)
        try:
            url = f"{receiver.url}/pb?idfa=6D92078A-8246-4BA4-AE5B-76104861E7DC&event=install"
            request = OutgoingRequest("GET", url, url, {"X-Idempotency-Key": "bench"})
            adapter = Probe()
            settings = SimpleNamespace(
                http_user_agent="postback-relay-bench", concurrency=64, deliveries_in_flight=64
            )
            session = http_session(settings)  # type: ignore[arg-type]
            sender = Sender(http_client(settings))  # type: ignore[arg-type]
            bare = urllib3.PoolManager(num_pools=32, maxsize=64)
            timeout = urllib3.Timeout(connect=5.0, read=10.0, total=15.0)
            ways: dict[str, Callable[[], object]] = {
                "requests (0.3.0 sender)": lambda: requests_send(session, adapter, request),
                "urllib3 sender (HttpClient)": lambda: sender.send(adapter, request),
                "bare urllib3 PoolManager.request": lambda: bare.request(
                    "GET", url, timeout=timeout, retries=False, redirect=False
                ),
            }
            header(
                "http_sender: one delivery's HTTP step, requests vs urllib3 (one process)",
                machine=machine(),
                partner=f"bench/receiver.py at {receiver.url}, answering at once, keep-alive",
                sends=f"{per_round * args.rounds:,} per way in {args.rounds} interleaved rounds",
            )
            for send in ways.values():  # warm-up: connections open, code paths hot
                measure(send, 200)
            for send in ways.values():  # the way each outcome reads, once: all must agree
                outcome = send()
                status = getattr(outcome, "status", None) or getattr(outcome[0], "status", "?")  # type: ignore[index]
                assert status == 200, outcome
            totals = {name: [0.0, 0.0] for name in ways}
            for _ in range(args.rounds):
                for name, send in ways.items():
                    wall, cpu = measure(send, per_round)
                    totals[name][0] += wall
                    totals[name][1] += cpu
            count = per_round * args.rounds
            for name, (wall, cpu) in totals.items():
                row(
                    name, f"{count / wall:,.0f} requests/s", f"{cpu * 1000 / count:.3f} ms CPU each"
                )
            old_wall, old_cpu = totals["requests (0.3.0 sender)"]
            new_wall, new_cpu = totals["urllib3 sender (HttpClient)"]
            row("requests / urllib3 sender, CPU per request", f"{old_cpu / new_cpu:.2f}x")
            row("urllib3 sender / requests, requests/s", f"{old_wall / new_wall:.2f}x")
            received = receiver.count()
            row("requests the receiver counted", f"{received:,}")
        finally:
            receiver.stop()


if __name__ == "__main__":
    run_main(main)
