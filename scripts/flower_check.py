"""Start a worker and Flower (embedded Redis unless REDIS_URL is set), open Flower's workers page
in headless Chromium, save a screenshot, and fail unless the worker is listed on the page.

    python scripts/flower_check.py --screenshot flower-workers.png
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from workers.dev.embedded_redis import EmbeddedRedis, free_port, redis_answers

DESTINATIONS = """
[[destination]]
name = "demo"
kind = "templated"
url = "http://127.0.0.1:9/pb?e=(event-name)"
[[destination.routes]]
type = "install"
"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic", "--virtual-time-budget=15000"]  # fmt: skip


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli.main", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_for_worker_in_api(base: str, auth: tuple[str, str], hostname: str) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            workers = requests.get(f"{base}/api/workers?refresh=1", auth=auth, timeout=10).json()
        except (requests.RequestException, ValueError):
            workers = {}
        if hostname in workers and workers[hostname].get("active_queues"):
            return workers  # type: ignore[no-any-return]
        time.sleep(1)
    raise SystemExit(f"FAIL: Flower's API never listed {hostname} with its queues")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--screenshot", type=Path, default=Path("flower-workers.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flower-check-"))
    dest_file = work / "destinations.toml"
    dest_file.write_text(DESTINATIONS)
    user, password, port = "ops", secrets.token_urlsafe(12), free_port()
    external = os.environ.get("REDIS_URL")
    embedded = None
    if not (external and redis_answers(external)):
        embedded = EmbeddedRedis(work / "redis").start()
    redis_url = external if embedded is None else embedded.url
    env = {
        **os.environ,
        "POSTBACK_RELAY_REDIS_URL": redis_url,
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(dest_file),
        "POSTBACK_RELAY_LOG_FORMAT": "json",
        "POSTBACK_RELAY_FLOWER_USER": user,
        "POSTBACK_RELAY_FLOWER_PASSWORD": password,
    }
    hostname = f"screenshot-{secrets.token_hex(3)}@localhost"
    worker = _spawn(
        ["worker", "--queues", "templated", "--hostname", hostname], env, work / "w.log"
    )
    flower = _spawn(["flower", "--port", str(port)], env, work / "flower.log")
    try:
        base = f"http://127.0.0.1:{port}"
        workers = wait_for_worker_in_api(base, (user, password), hostname)
        queues = [q["name"] for q in workers[hostname]["active_queues"]]
        print(f"Flower API lists {hostname} consuming {queues}")
        url = f"http://{user}:{password}@127.0.0.1:{port}/workers"
        subprocess.run(
            [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chrome'}",
             "--window-size=1280,800", f"--screenshot={args.screenshot.resolve()}", url],
            capture_output=True, timeout=90, check=False,
        )  # fmt: skip
        dom = ""
        for _ in range(3):  # the page fills its table from Flower's API after loading
            dom = subprocess.run(
                [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chrome'}",
                 "--dump-dom", url],
                capture_output=True, text=True, timeout=90, check=False,
            ).stdout  # fmt: skip
            if hostname in dom:
                break
        if hostname not in dom:
            print(f"FAIL: {hostname} is not on Flower's workers page", file=sys.stderr)
            return 1
        if not args.screenshot.exists() or args.screenshot.stat().st_size < 1000:
            print("FAIL: Chromium wrote no screenshot", file=sys.stderr)
            return 1
        print(f"OK: {hostname} is on the workers page; screenshot {args.screenshot}")
        return 0
    finally:
        _stop(flower)
        _stop(worker)
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
