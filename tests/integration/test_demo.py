"""The README's first command: `postback-relay demo` on embedded defaults runs every destination
kind, reports figures that match what the partners received and what Redis recorded, fits 80
columns, and stops every process it started."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from config.keys import RedisKeys
from workers.dev.demo_partners import FORCED_FAILURES, TEMPLATED
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "postback-relay"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes; /proc tells the state
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def _run_demo(tmp_path: Path, env: dict[str, str]) -> tuple[str, dict[str, Any], Path]:
    data_dir = tmp_path / "demo"
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [str(CLI), "demo", "--duration", "8", "--rate", "15", "--data-dir", str(data_dir),
         "--summary-json", str(summary)],
        env={**env, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output, json.loads(summary.read_text()), data_dir


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_against_request_logs(figures: dict[str, Any], data_dir: Path) -> None:
    """The summary's figures, recounted from each partner's request log."""
    kinds, dests = figures["kinds"], figures["destinations"]
    receiver = _jsonl(data_dir / "requests-receiver.jsonl")
    # templated: distinct deliveries answered 2xx per partner; every 400 is a dead letter
    for name, path in TEMPLATED.items():
        ok = {r["key"] for r in receiver if r["path"] == path and 200 <= r["status"] < 300}
        assert dests[name]["delivered"] == len(ok) > 0, name
        assert dests[name]["produced"] == len(ok) + dests[name]["dead_lettered"], name
    refused = [r for r in receiver if r["path"] == "/events" and r["status"] == 400]
    assert len(refused) == FORCED_FAILURES
    assert dests["network-events"]["dead_lettered"] == FORCED_FAILURES
    assert kinds["templated"]["dead_lettered"] == FORCED_FAILURES
    assert dests["analytics-flaky"]["refused"] > 0  # 503s, retried to success
    assert not [r for r in receiver if r["path"] == "/flaky" and r["status"] == 400]

    # X: every request verified (no 401), one per produced delivery; the attribution flags agree
    # with the sandbox's own rule (sha256 of the hashed id, share 0.4), recomputed here
    x_log = _jsonl(data_dir / "requests-x.jsonl")
    x = kinds["x_mact"]
    assert {r["status"] for r in x_log} == {200}
    assert x["requests"] == x["signed"] == x["device_ids_verified"] == len(x_log)
    assert x["produced"] == x["delivered"] == len({r["key"] for r in x_log}) > 0
    for line in x_log:
        hashed = line["params"]["hashed_device_id"]
        assert len(base64.b64decode(hashed)) == 32
        expected = hashlib.sha256(hashed.encode()).digest()[0] / 256 < 0.4
        assert line["attributed"] == expected
    assert x["attributed"] == sum(r["attributed"] for r in x_log) > 0

    # XMP: the latest totals per daily record add up to every event produced for XMP
    xmp_log = _jsonl(data_dir / "requests-xmp.jsonl")
    xmp = kinds["xmp"]
    latest: dict[str, dict[str, Any]] = {}
    for body in xmp_log:
        for record in body["records"]:
            latest[record["request_id"]] = record
    assert xmp["requests"] == len(xmp_log) >= 1
    assert xmp["records_sent"] == sum(len(b["records"]) for b in xmp_log)
    assert xmp["daily_records"] == len(latest) < xmp["produced"]
    assert xmp["produced"] == xmp["aggregated"] == sum(r["event_count"] for r in latest.values())
    # a record flushed again carries its corrected totals (counted above from the last one)
    assert xmp["records_sent"] >= xmp["daily_records"]

    # reconciler: exactly the never-sent postbacks, each once; none that AppMetrica sent later
    redelivered = Counter(r["target"] for r in receiver if r["path"].startswith("/pb/"))
    never = {f"{u.path}?{u.query}" for u in map(urlsplit, figures["partners"]["never_sent_urls"])}
    assert set(redelivered) == never
    assert set(redelivered.values()) == {1}
    assert kinds["redeliver"]["redelivered"] == kinds["redeliver"]["delivered"] == len(never) == 4
    # 11 rows: 4 never sent (one of them failed twice), 2 sent later (2 rows each), 2 sent
    assert kinds["redeliver"]["export_rows"] == 11
    assert _jsonl(data_dir / "requests-appmetrica.jsonl")  # the reconciler asked for the export
    assert all(row["pending"] == 0 for row in dests.values())


def _check_output(output: str, figures: dict[str, Any]) -> None:
    lines = output.splitlines()
    too_wide = [line for line in lines if len(line) > 80 and "export " not in line
                and "dlq " not in line]  # fmt: skip
    assert too_wide == [], too_wide
    assert re.search(r"Started metrics \(pid \d+\): http://127\.0\.0\.1:\d+/metrics", output)
    assert figures["metrics_samples"] > 0  # it served postback_relay_* samples while up
    assert "Summary per kind" in output
    dead = re.search(r"dead-lettered +(\d+) +(\d+) +(\d+) +(\d+)", output)
    assert dead
    assert dead.groups() == tuple(
        str(figures["kinds"][k]["dead_lettered"])
        for k in ("templated", "x_mact", "xmp", "redeliver")
    )
    attributed = re.search(r"attributed by X +- +(\d+)", output)
    assert attributed
    assert int(attributed.group(1)) == figures["kinds"]["x_mact"]["attributed"]
    assert re.search(r"^  \S*postback-relay dlq list$", output, re.M)
    assert re.search(r"^  \S*postback-relay dlq replay --destination network-events$", output, re.M)
    assert "Stopped every process the demo started." in output


def _check_all_stopped(output: str, figures: dict[str, Any], data_dir: Path) -> None:
    pids = list(figures["processes"].values())
    pids += [int(p) for p in re.findall(r"Started embedded Redis \(pid (\d+)\)", output)]
    assert set(figures["processes"]) >= {"worker", "beat", "metrics", "flower", "reconcile"}
    assert [pid for pid in pids if _alive(pid)] == []
    ps = subprocess.run(
        ["ps", "-o", "pid=,stat=,args=", "-p", ",".join(map(str, pids))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert [line for line in ps.stdout.splitlines() if line.split()[1][0] != "Z"] == []


def test_demo_runs_every_kind_on_embedded_defaults_and_counts_what_partners_got(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if "REDIS_URL" not in k}
    env.pop("POSTBACK_RELAY_DESTINATIONS_FILE", None)
    output, figures, data_dir = _run_demo(tmp_path, env)
    assert "Started embedded Redis" in output
    assert re.search(r"Flower \(pid \d+\): http://127\.0\.0\.1:\d+", output)
    assert (data_dir / "redis" / "appendonlydir").is_dir() or list(
        (data_dir / "redis").glob("appendonly*")
    ), "embedded Redis must persist with AOF"
    _check_output(output, figures)
    _check_against_request_logs(figures, data_dir)
    _check_all_stopped(output, figures, data_dir)


def test_demo_figures_match_the_attempt_log_and_dead_letters_in_its_redis(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """With REDIS_URL set the demo uses that Redis, which outlives it: what the workers recorded
    there (attempt log, dead letters, the XMP counter) is compared with the demo's figures."""
    env = {k: v for k, v in os.environ.items() if "REDIS_URL" not in k}
    env.pop("POSTBACK_RELAY_DESTINATIONS_FILE", None)
    output, figures, data_dir = _run_demo(tmp_path, {**env, "REDIS_URL": redis_url})
    assert f"Using Redis at {redis_url}" in output
    kinds, dests = figures["kinds"], figures["destinations"]
    keys = RedisKeys("pr")

    dead = DeadLetterStore(redis_client, keys)
    assert dead.counts_by_destination() == {"network-events": FORCED_FAILURES}
    assert {entry.reason_category for entry in dead.iter_entries()} == {"HTTP 400"}

    attempts = list(AttemptLog(redis_client, keys, 100_000).iter_records())
    sent = [a for a in attempts if a["notifying_status"] == "sent"]
    by_dest = Counter(
        dest
        for dest, _ in {(a["destination"], a["delivery_id"]) for a in sent if a.get("delivery_id")}
    )
    for name in (*TEMPLATED, "x", "redeliver"):
        assert by_dest[name] == dests[name]["delivered"], name
    x_attributed = [
        a for a in sent
        if a["destination"] == "x" and json.loads(a.get("attribution") or "{}").get(
            "twitter_attribution")
    ]  # fmt: skip
    assert len(x_attributed) == kinds["x_mact"]["attributed"] > 0
    flushes = [a for a in sent if a["destination"] == "xmp"]
    assert len(flushes) == kinds["xmp"]["requests"]
    assert sum(int(a["records"]) for a in flushes) == kinds["xmp"]["records_sent"]
    aggregated = redis_client.hget(keys.metrics_counters(), "xmp|aggregated")
    assert int(aggregated or 0) == kinds["xmp"]["aggregated"] == kinds["xmp"]["produced"]
    _check_all_stopped(output, figures, data_dir)
