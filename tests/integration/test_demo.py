"""The README's first command: `postback-relay demo` on embedded defaults delivers and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes; /proc tells the state
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def test_demo_runs_without_redis_or_credentials_and_delivers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if "REDIS_URL" not in k}
    env.pop("POSTBACK_RELAY_DESTINATIONS_FILE", None)
    data_dir = tmp_path / "demo"
    cli = Path(sys.executable).parent / "postback-relay"
    result = subprocess.run(
        [str(cli), "demo", "--duration", "6", "--rate", "15", "--data-dir", str(data_dir)],
        env={**env, "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Started embedded Redis" in output
    assert re.search(r"Flower \(pid \d+\): http://127\.0\.0\.1:\d+", output)

    summary = re.search(r"produced (\d+) deliveries, delivered (\d+), still pending (\d+)", output)
    assert summary, output[-2000:]
    produced, delivered, pending = map(int, summary.groups())
    assert produced > 50
    assert delivered == produced
    assert pending == 0
    # the flaky partner answered 503 to some requests and they were retried to success
    flaky = re.search(r"analytics-flaky: delivered (\d+), answered non-2xx (\d+)", output)
    assert flaky
    assert int(flaky.group(1)) > 0
    assert int(flaky.group(2)) > 0

    assert (data_dir / "redis" / "appendonlydir").is_dir() or list(
        (data_dir / "redis").glob("appendonly*")
    ), "embedded Redis must persist with AOF"
    pids = [
        int(p)
        for p in re.findall(r"Started (?:embedded Redis|worker|Flower) \(pid (\d+)\)", output)
    ]
    assert len(pids) == 3
    assert [pid for pid in pids if _alive(pid)] == []
