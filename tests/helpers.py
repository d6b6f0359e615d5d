"""Small helpers shared by the integration and failure tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "postback-relay"


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
