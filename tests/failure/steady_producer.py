"""A backend service producing steadily, for the failover tests: ``python -m
tests.failure.steady_producer OUT PREFIX COUNT RATE``, configured like any producer by the
``POSTBACK_RELAY_*`` environment (the Redis URL, the replica wait).

Each event is produced until produce() returns, again with the same event_id after an error
(a lost master, too few replica acknowledgements), as the NotReplicated message advises. OUT
gets one line per step, flushed at once so a SIGKILL loses nothing written:
``try <event_id>`` before each call, ``ok <event_id> <delivery id>...`` once it returned (its
accepted and duplicate delivery ids), ``error <event_id> <error type>`` after each failure.
SIGTERM stops it after the event in hand.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import redis

from producers import NotReplicated, Producer

RETRY_PAUSE = 0.05
GIVE_UP_AFTER = 60.0

stopping = False


def install(event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "app_id": "123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T10:00:00+01:00",
        "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
    }


def produce_until_returned(producer: Producer, event_id: str, out: Any) -> None:
    out.write(f"try {event_id}\n")
    out.flush()
    deadline = time.monotonic() + GIVE_UP_AFTER
    while True:
        try:
            result = producer.produce(install(event_id))
        except (redis.RedisError, NotReplicated, OSError) as exc:
            out.write(f"error {event_id} {type(exc).__name__}\n")
            out.flush()
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_PAUSE)
            continue
        out.write(f"ok {event_id} {' '.join([*result.accepted, *result.duplicates])}\n")
        out.flush()
        return


def main(out_path: str, prefix: str, count: str, rate: str) -> None:
    def stop(_signum: int, _frame: object) -> None:
        global stopping  # noqa: PLW0603 - the signal handler's flag
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    producer = Producer.from_settings()
    interval = 1 / float(rate)
    with Path(out_path).open("a", encoding="utf-8") as out:
        next_at = time.monotonic()
        for index in range(int(count)):
            if stopping:
                break
            produce_until_returned(producer, f"{prefix}-{index}", out)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        out.write("done\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
