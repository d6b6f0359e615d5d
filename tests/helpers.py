"""Small helpers shared by the integration and failure tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "postback-relay"


# Two templated destinations for installs: one sends at once, one after a route delay.
NOW_AND_LATER = """
[[destination]]
name = "now"
kind = "templated"
url = "https://a.example/i"
[[destination.routes]]
type = "install"

[[destination]]
name = "later"
kind = "templated"
url = "https://b.example/i"
[[destination.routes]]
type = "install"
delay_seconds = 60
"""


IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"


def install_event(event_id: str, idfa: str = IDFA) -> dict[str, object]:
    """An iOS install of one app, as a service would produce it."""
    return {
        "event_id": event_id,
        "app_id": "id123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T10:00:00Z",
        "idfa": idfa,
    }


def wait_until(
    predicate: Callable[[], object], timeout: float = 30, interval: float = 0.05
) -> bool:
    """Poll until ``predicate()`` is truthy; False when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def max_in_any_window(times: Sequence[float], width: float = 1.0) -> int:
    """The most timestamps in any window [t, t + width) that starts at one of them."""
    ordered = sorted(times)
    best, end = 0, 0
    for start, t in enumerate(ordered):
        while end < len(ordered) and ordered[end] < t + width:
            end += 1
        best = max(best, end - start)
    return best


def net_destination_toml(receiver_url: str) -> str:
    """One templated destination, "net", receiving installs at the receiver's /pb."""
    return f"""
[[destination]]
name = "net"
kind = "templated"
url = "{receiver_url}/pb?idfa=(idfa)"
[[destination.routes]]
type = "install"
"""


def cli_env(redis_url: str, destinations_file: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "POSTBACK_RELAY_REDIS_URL": redis_url,
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(destinations_file),
        "POSTBACK_RELAY_LOG_FORMAT": "json",
        "COLUMNS": "120",
        **extra,
    }


def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the `postback-relay` console script as an operator would."""
    return subprocess.run(
        [str(CLI), *args],
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def one_of_each_kind(base: str, xmp_token_file: Path) -> str:
    """A destinations file with a destination of every kind, each with secrets of its own, and a
    reconcile source: which process reads which of them is what the secret-scope tests check.
    X comes first so that the file's order cannot decide what a worker asks for."""
    return f"""
[[destination]]
name = "x"
kind = "x_mact"
base_url = "{base}"
[destination.credentials]
consumer_key = {{ env = "X_CONSUMER_KEY" }}
consumer_secret = {{ env = "X_CONSUMER_SECRET" }}
access_token = {{ env = "X_ACCESS_TOKEN" }}
access_token_secret = {{ env = "X_ACCESS_TOKEN_SECRET" }}
partner_key = {{ env = "X_PARTNER_KEY" }}
[[destination.routes]]
type = "install"

[[destination]]
name = "partner"
kind = "templated"
url = "{base}/pb?idfa=(idfa)&key={{credential:api_key}}"
headers = {{ X-Api-Key = "{{credential:api_key}}" }}
credentials = {{ api_key = {{ env = "PARTNER_API_KEY" }} }}
[[destination.routes]]
type = "install"

[[destination]]
name = "xmp"
kind = "xmp"
credentials = {{ xmp_token = {{ file = "{xmp_token_file}" }} }}
[[destination.routes]]
type = "event"

[[destination]]
name = "redeliver"
kind = "redeliver"

[[reconcile]]
name = "main"
application_id = "1111"
token = {{ env = "APPMETRICA_TOKEN" }}
redeliver_to = "redeliver"
"""


INSTALL = {
    "event_id": "install-1",
    "app_id": "123456789",
    "platform": "ios",
    "event_name": "install",
    "event_time": "2026-11-22T10:00:00Z",
    "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
}


def start_metrics(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A ``postback-relay metrics`` process on a free port, in a session of its own (stop it
    with os.killpg): the process and its /metrics URL."""
    from workers.dev.embedded_redis import free_port

    port = free_port()
    proc = subprocess.Popen(
        [str(CLI), "metrics", "--port", str(port), "--address", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}/metrics"


def scrape(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> str:
    """The text at ``url`` once it answers (a metrics process starting); with ``proc``, fail
    at once should that process exit meanwhile."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert proc is None or proc.poll() is None, (
            f"postback-relay metrics exited {proc.returncode}"
        )
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return str(answer.read().decode())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
