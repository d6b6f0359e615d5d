"""Reconciler end to end: an in-process SandboxAppMetrica -> `postback-relay reconcile` (a real
CLI process) or the periodic reconcile task -> Redis -> a real worker on the redeliver queue ->
a real local PostbackReceiver, asserted exactly: one GET per never-sent postback with the exact
exported URL, none for a postback that was sent later, nothing twice."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from config.destinations import load_destinations
from config.keys import RedisKeys, queue_for
from config.settings import Settings
from schemas.appmetrica import TIME_FORMAT, ExportRow
from schemas.envelope import delivery_id_for
from tests import helpers
from tests.conftest import WorkerProcess
from workers.dev.receiver import PostbackReceiver
from workers.kinds.redeliver.sandbox import SandboxAppMetrica
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

TOKEN = "appmetrica-e2e-token-81d2f4c6a9"
KEYS = RedisKeys("pr")
QUEUE = queue_for("redeliver")
CLI = Path(sys.executable).parent / "postback-relay"
DEVICE = "6D92078A-8246-4BA4-AE5B-76104861E7DC"


def destinations_toml(sandbox_url: str, allow_private: bool = True, extra: str = "") -> str:
    return f"""
[[destination]]
name = "redeliver"
kind = "redeliver"
allow_private = {"true" if allow_private else "false"}
retry = {{ max_attempts = 2, schedule = [0.3, 0.3], jitter = 0 }}
{extra}

[[reconcile]]
name = "main"
application_id = "1111"
token = {{ env = "APPMETRICA_TOKEN" }}
redeliver_to = "redeliver"
base_url = "{sandbox_url}"
settle_seconds = 0
poll_seconds = 1
"""


def row(postback_url: str, status: str, ts: int, device: str = DEVICE) -> dict[str, Any]:
    """One attempt row as in AppMetrica's official example: every value a string."""
    return {
        "application_id": "1111",
        "click_id": "f2ae4254de8844dda58b29cac2cf0e87",
        "google_aid": "",
        "ios_ifa": device,
        "appmetrica_device_id": "123456789012345678",
        "conversion_datetime": datetime.fromtimestamp(ts, UTC).strftime(TIME_FORMAT),
        "conversion_timestamp": str(ts),
        "event_name": "New person",
        "attempt_timestamp": str(ts + 5),
        "cost_model": "cpi",
        "notifying_status": status,
        "postback_url": postback_url,
        "postback_url_parameters": postback_url.partition("?")[2],
        "response_body": "SUCCESS" if status == "sent" else "",
        "response_code": "200" if status == "sent" else "",
    }


def run_cli(redis_url: str, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return helpers.run_cli(
        helpers.cli_env(redis_url, path, APPMETRICA_TOKEN=TOKEN), *args, timeout=80
    )


def table(stdout: str) -> dict[str, int]:
    """The CLI's rich table as {label: count}."""
    counts = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)]
        cells = [c for c in cells if c]
        if len(cells) == 2 and cells[1].isdigit():
            counts[cells[0]] = int(cells[1])
    return counts


def expected_delivery_id(exported: dict[str, Any]) -> str:
    identity = ExportRow.model_validate(exported).identity
    return delivery_id_for(f"reconcile:main:{identity}", "redeliver")


def settle(check: Callable[[], bool], timeout: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{worker.log()[-4000:]}")


@pytest.fixture
def sandbox() -> Iterator[SandboxAppMetrica]:
    with SandboxAppMetrica(token=TOKEN) as server:
        yield server


@pytest.fixture
def scenario(
    sandbox: SandboxAppMetrica, receiver: PostbackReceiver
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows in the sandbox; returns (the never-sent postbacks' first rows, sent-later URLs)."""
    now = int(time.time())
    base = receiver.url
    never = [
        row(
            f"{base}/pb/adcolony?transaction_id=t1&event=New%20person&ifa={DEVICE}",
            "failed",
            now - 1200,
        ),
        row(
            f"{base}/pb/adcolony?transaction_id=t2&event=New%20person&ifa={DEVICE}",
            "failed",
            now - 1500,
        ),
        row(f"{base}/pb/unity?click=c%2F3&sum=4.99&cur=EUR", "failed", now - 900),
        row(f"{base}/pb/mintegral?cid=abc&ts={now - 600}", "failed", now - 600),
    ]
    late = [
        f"{base}/pb/late-a?transaction_id=l1",
        f"{base}/pb/late-b?transaction_id=l2",
    ]
    rows = [*never, never[0]]  # t1 failed twice, never sent
    for url in late:
        rows += [row(url, "failed", now - 1000), row(url, "sent", now - 1000)]
    rows.append(row(f"{base}/pb/ok?transaction_id=ok", "sent", now - 700))
    sandbox.rows = rows
    return never, late


def test_cli_dry_run_then_reconcile_redelivers_each_never_sent_postback_once(
    sandbox: SandboxAppMetrica,
    receiver: PostbackReceiver,
    scenario: tuple[list[dict[str, Any]], list[str]],
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    never, late = scenario
    sandbox.polls_before_ready = 1  # the CLI polls once
    path = write_destinations(destinations_toml(sandbox.url))
    worker = start_worker(
        path, "--queues", "redeliver", "--concurrency", "4", env={"APPMETRICA_TOKEN": TOKEN}
    )

    dry = run_cli(redis_url, path, "reconcile", "--source", "main", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "(dry run)" in dry.stdout
    assert table(dry.stdout) == {
        "rows read": 10,
        "unparseable rows": 0,
        "postbacks": 7,
        "already sent": 3,
        "to redeliver": 4,
        "would redeliver": 4,
        "skipped: already redelivered": 0,
    }, dry.stdout
    # it polled: a 202, then the same query again
    assert len(sandbox.requests) == 2
    assert sandbox.requests[0] == sandbox.requests[1]
    time.sleep(1.5)
    assert receiver.received() == []
    assert redis_client.llen(QUEUE) == 0
    assert list(redis_client.scan_iter(match="{pr}:reconcile:main:done:*")) == []

    real = run_cli(redis_url, path, "reconcile", "--source", "main")
    assert real.returncode == 0, real.stdout + real.stderr
    assert "(dry run)" not in real.stdout
    counts = table(real.stdout)
    assert counts["rows read"] == 10
    assert counts["to redeliver"] == 4
    assert counts["redelivered"] == 4, real.stdout
    assert counts["skipped: already redelivered"] == 0

    got = receiver.wait_for(4, timeout=30)
    time.sleep(1.5)  # nothing more may arrive
    got = receiver.received()
    assert len(got) == 4, worker.log()[-4000:]
    assert all(r.method == "GET" for r in got)
    by_url = {f"{receiver.url}{r.raw_target}": r for r in got}
    assert set(by_url) == {r["postback_url"] for r in never}  # exactly the exported URLs
    for exported in never:
        request = by_url[exported["postback_url"]]
        assert request.headers["X-Idempotency-Key"] == expected_delivery_id(exported)
    assert not set(late) & set(by_url)  # failed, then sent: never redelivered
    assert not any(r.path.startswith("/pb/late") or r.path == "/pb/ok" for r in got)
    assert {r.status for r in got} == {200}
    assert DeadLetterStore(redis_client, KEYS).count() == 0
    records = list(AttemptLog(redis_client, KEYS, 1000).iter_records())
    assert len(records) == 4
    assert {r["notifying_status"] for r in records} == {"sent"}
    assert {r["destination"] for r in records} == {"redeliver"}

    again = run_cli(redis_url, path, "reconcile", "--source", "main")
    assert again.returncode == 0, again.stdout + again.stderr
    counts = table(again.stdout)
    assert counts["to redeliver"] == 4  # still failed in the export (the overlap re-reads them)
    assert counts["redelivered"] == 0
    assert counts["skipped: already redelivered"] == 4
    time.sleep(1.5)
    assert len(receiver.received()) == 4
    assert TOKEN not in dry.stdout + dry.stderr + real.stdout + real.stderr + worker.log()


@pytest.fixture
def reconcile_env(
    sandbox: SandboxAppMetrica, write_destinations: Callable[[str], Path], redis_url: str
) -> dict[str, str]:
    """The environment of a `postback-relay reconcile` run against the sandbox."""
    path = write_destinations(destinations_toml(sandbox.url))
    return helpers.cli_env(redis_url, path, APPMETRICA_TOKEN=TOKEN)


def test_cli_since_without_until_polls_one_fixed_window_until_the_export_is_ready(
    sandbox: SandboxAppMetrica,
    scenario: tuple[list[dict[str, Any]], list[str]],
    reconcile_env: dict[str, str],
    redis_client: redis.Redis,
) -> None:
    """Each poll used to ask for "now minus settle" again: a new export each time, 202 forever."""
    never, _late = scenario
    sandbox.polls_before_ready = 2  # poll_seconds = 1: the clock moves on between polls
    result = helpers.run_cli(
        reconcile_env, "reconcile", "--source", "main", "--since", "48h", timeout=40
    )
    assert result.returncode == 0, result.stdout + result.stderr

    assert len(sandbox.queries) == 3  # two 202s, then the data
    assert sandbox.queries[0] == sandbox.queries[1] == sandbox.queries[2]
    asked = sandbox.requests[0]
    title = f"reconcile main: {asked['date_since']} to {asked['date_until']} UTC"
    assert title in " ".join(result.stdout.split())  # the window asked for, whatever the wrap
    counts = table(result.stdout)
    assert counts["rows read"] == 10
    assert counts["redelivered"] == len(never) == redis_client.llen(QUEUE)
    # Not a terminal: the wait is told in plain lines, one per poll.
    waits = [line for line in result.stderr.splitlines() if "export is being prepared" in line]
    assert len(waits) == 2, result.stderr
    assert waits[0].startswith("reconcile main: export is being prepared: 1 poll(s) in ")
    assert waits[1].startswith("reconcile main: export is being prepared: 2 poll(s) in ")
    assert waits[1].endswith(", asking again in 1s (waiting 300s at most)")
    # the operator's window neither moves the checkpoint nor stays pending
    assert redis_client.get(KEYS.reconcile_checkpoint("main")) is None
    assert redis_client.get(KEYS.reconcile_pending("main")) is None


def test_cli_gives_up_with_exit_1_when_the_export_never_comes(
    sandbox: SandboxAppMetrica, reconcile_env: dict[str, str], redis_client: redis.Redis
) -> None:
    sandbox.polls_before_ready = 10**9  # AppMetrica answers 202 forever
    # Today's code never returns: run_cli's timeout would end the test with TimeoutExpired.
    result = helpers.run_cli(
        reconcile_env, "reconcile", "-s", "main", "--since", "48h", "--max-wait", "2.5s", timeout=40
    )
    assert result.returncode == 1, result.stdout + result.stderr
    asked = sandbox.requests[0]
    message = " ".join(result.stderr.split())  # rich/click may wrap it
    waited = re.search(
        f"Error: no export from AppMetrica for {asked['date_since']} to {asked['date_until']} "
        r"UTC within --max-wait 2\.5s \((\d+) poll\(s\) in \d+s, the last answer: export is "
        r"being prepared\)",
        message,
    )
    assert waited is not None, result.stderr
    since, until = (asked[k].replace(" ", "T") + "Z" for k in ("date_since", "date_until"))
    assert f"run reconcile again later with --since {since} --until {until}" in message
    assert len(sandbox.queries) == int(waited[1]) >= 2  # poll_seconds = 1 within 2.5 s
    assert len(set(sandbox.queries)) == 1
    assert table(result.stdout) == {}  # no table of zeros
    assert redis_client.llen(QUEUE) == 0


def test_cli_on_a_terminal_shows_the_wait_with_a_spinner(
    sandbox: SandboxAppMetrica, reconcile_env: dict[str, str]
) -> None:
    sandbox.polls_before_ready = 2
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [str(CLI), "reconcile", "--source", "main"],
        env={**reconcile_env, "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    ) as process:
        os.close(terminal)
        shown, deadline = b"", time.monotonic() + 30
        while time.monotonic() < deadline and (chunk := _read_pty(controller)):
            shown += chunk
        assert process.wait(timeout=1) == 0
    os.close(controller)
    text = shown.decode(errors="replace")
    assert "export is being prepared: 2 poll(s), asking again in 1s (waiting 300s at most)" in text
    assert "0:00:01" in text  # the spinner's elapsed column, counting while it waits
    assert "reconcile main: export is being prepared" not in text  # no plain lines on a terminal


def _read_pty(fd: int) -> bytes:
    """What the process wrote to its terminal next; b"" once it has closed it."""
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: every writer has closed the terminal
        return b""


def test_loopback_postback_is_refused_and_dead_lettered_without_allow_private(
    sandbox: SandboxAppMetrica,
    receiver: PostbackReceiver,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    now = int(time.time())
    url = f"{receiver.url}/pb/internal?transaction_id=x1"
    sandbox.rows = [row(url, "failed", now - 600)]
    path = tmp_path / "strict-destinations.toml"
    path.write_text(destinations_toml(sandbox.url, allow_private=False))
    worker = start_worker(
        path, "--queues", "redeliver", "--concurrency", "4", env={"APPMETRICA_TOKEN": TOKEN}
    )

    result = run_cli(redis_url, path, "reconcile", "--source", "main")
    assert result.returncode == 0, result.stdout + result.stderr
    assert table(result.stdout)["redelivered"] == 1

    store = DeadLetterStore(redis_client, KEYS)
    delivery_id = expected_delivery_id(sandbox.rows[0])
    settle(lambda: store.get(delivery_id) is not None, 20, "the dead letter", worker)
    entry = store.get(delivery_id)
    assert entry is not None
    assert entry.destination == "redeliver"
    assert "non-public address" in entry.reason
    assert "127.0.0.1" in entry.reason
    assert entry.envelope is not None
    assert entry.envelope.redelivery is not None
    assert entry.envelope.redelivery.postback_url == url
    assert store.count() == 1
    time.sleep(1.0)
    assert receiver.received() == []
    assert list(AttemptLog(redis_client, KEYS, 1000).iter_records()) == []


def test_a_redirect_to_a_refused_host_is_not_followed(
    sandbox: SandboxAppMetrica,
    receiver: PostbackReceiver,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    from workers.dev.receiver import Answer, ReceivedRequest

    port = receiver.url.rsplit(":", 1)[1]
    inside = f"http://127.0.0.1:{port}/internal/metadata"

    def answer(req: ReceivedRequest, seen: int) -> Answer:
        if req.path == "/pb/redirecting":
            return Answer(302, "", headers={"Location": inside})
        return Answer(200)

    receiver.responder = answer
    now = int(time.time())
    sandbox.rows = [row(f"http://localhost:{port}/pb/redirecting?t=1", "failed", now - 600)]
    path = tmp_path / "allowlist-destinations.toml"
    path.write_text(destinations_toml(sandbox.url, extra='host_allowlist = ["localhost"]'))
    worker = start_worker(
        path, "--queues", "redeliver", "--concurrency", "4", env={"APPMETRICA_TOKEN": TOKEN}
    )
    result = run_cli(redis_url, path, "reconcile", "--source", "main")
    assert result.returncode == 0, result.stdout + result.stderr
    assert table(result.stdout)["redelivered"] == 1

    receiver.wait_for(1, timeout=20)
    log = AttemptLog(redis_client, KEYS, 1000)
    settle(lambda: len(list(log.iter_records())) >= 1, 20, "the attempt record", worker)
    time.sleep(1.5)
    paths = [r.path for r in receiver.received()]
    assert paths == ["/pb/redirecting"], paths  # 127.0.0.1 is not in the allow-list


def test_periodic_reconcile_task_polls_by_itself_and_redelivers(
    sandbox: SandboxAppMetrica,
    receiver: PostbackReceiver,
    scenario: tuple[list[dict[str, Any]], list[str]],
    write_destinations: Callable[[str], Path],
    start_worker: Callable[..., WorkerProcess],
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    from workers.app import create_app
    from workers.kinds.redeliver.tasks import RECONCILE_TASK

    never, _late = scenario
    sandbox.polls_before_ready = 2
    path = write_destinations(destinations_toml(sandbox.url))
    worker = start_worker(
        path, "--queues", "redeliver", "--concurrency", "4", env={"APPMETRICA_TOKEN": TOKEN}
    )
    settings = Settings(redis_url=redis_url, destinations_file=path)
    sending = load_destinations(path).with_secrets({"APPMETRICA_TOKEN": TOKEN}, kinds=["redeliver"])
    app = create_app(settings, sending)
    assert app.conf.beat_schedule["reconcile-main"]["task"] == RECONCILE_TASK
    assert app.conf.beat_schedule["reconcile-main"]["args"] == ("main",)
    try:
        app.send_task(RECONCILE_TASK, args=("main",), queue=QUEUE)
    finally:
        app.close()

    got = receiver.wait_for(4, timeout=45)
    assert len(got) == 4, worker.log()[-4000:]
    time.sleep(1.5)
    got = receiver.received()
    assert len(got) == 4
    assert {f"{receiver.url}{r.raw_target}" for r in got} == {r["postback_url"] for r in never}

    # two 202s and a 200, all for the same window, without anyone polling by hand
    assert len(sandbox.requests) == 3, worker.log()[-4000:]
    assert sandbox.requests[0] == sandbox.requests[1] == sandbox.requests[2]
    settle(
        lambda: redis_client.get(KEYS.reconcile_checkpoint("main")) is not None,
        10,
        "the checkpoint",
        worker,
    )
    checkpoint = float(redis_client.get(KEYS.reconcile_checkpoint("main")) or 0)
    assert (
        datetime.fromtimestamp(checkpoint, UTC).strftime(TIME_FORMAT)
        == sandbox.requests[0]["date_until"]
    )
    assert redis_client.get(KEYS.reconcile_pending("main")) is None
    assert redis_client.zcard(KEYS.delayed(QUEUE)) == 0
    assert redis_client.llen(QUEUE) == 0
    assert "done: rows 10, postbacks 7, redelivered 4, skipped 0" in worker.log()
