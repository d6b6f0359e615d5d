"""Flower refuses to start open, and shows the worker in a real browser. Flower with the Procfile's
workers (each listed, task args without PII, basic auth) is in test_procfile.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_flower_will_not_start_open_without_credentials(
    redis_url: str, net_destination: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_RELAY_FLOWER")}
    env.update(POSTBACK_RELAY_REDIS_URL=redis_url,
               POSTBACK_RELAY_DESTINATIONS_FILE=str(net_destination))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "flower", "--address", "0.0.0.0"],
        env=env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Flower needs credentials" in result.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_headless_chromium_sees_the_worker_on_the_workers_page(tmp_path: Path) -> None:
    shot = tmp_path / "workers.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "flower_check.py"), "--screenshot", str(shot)],
        capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is on the workers page" in result.stdout
    assert shot.stat().st_size > 10_000
