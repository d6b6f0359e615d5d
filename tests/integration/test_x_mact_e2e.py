"""X MACT end to end: produce() -> Redis -> a real `postback-relay worker --queues x_mact`
process -> SandboxX (in this process: oauthlib's server-side verifier, X's answers).

Identifying requests: X requests carry no delivery id, so each event gets its own device id and
a request is recognised by its hashed_device_id (computed here with hmac directly).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from config.keys import RedisKeys, queue_for
from producers.produce import Producer
from schemas.envelope import delivery_id_for
from tests.conftest import WorkerProcess
from workers.delivery.ratelimit import PauseRegistry
from workers.kinds.x_mact.sandbox import SandboxX, XCredentials, XRequest
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore

pytestmark = pytest.mark.integration

KEYS = RedisKeys("pr")
X_QUEUE = queue_for("x_mact")
CLI = Path(sys.executable).parent / "postback-relay"

CK = "ck-e2e-consumer-key-31337"
CS = "cs-e2e-Consumer-Secret-77aa"
AT = "at-e2e-4242424242-AccessTok"
ATS = "ats-e2e-Token-Secret-99bb"
PARTNER_KEY = b"e2e-partner-hmac-key-32-bytes-ok"
PK = base64.b64encode(PARTNER_KEY).decode()
WRONG_CS = "cs-e2e-WRONG-secret-0000"
ENV = {"X_CK": CK, "X_CS": CS, "X_AT": AT, "X_ATS": ATS, "X_PK": PK}
SECRETS = (CS, ATS, PK, WRONG_CS)

IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"


def gaid(n: int) -> str:
    return f"38400000-8cf0-11bd-b23e-{n:012d}"


def hashed(device_id: str) -> str:
    return base64.b64encode(
        hmac.new(PARTNER_KEY, device_id.encode(), hashlib.sha256).digest()
    ).decode()


def destinations_toml(base_url: str) -> str:
    return f"""
[[destination]]
name = "x"
kind = "x_mact"
base_url = "{base_url}"
credentials = {{ consumer_key = {{ env = "X_CK" }}, consumer_secret = {{ env = "X_CS" }}, access_token = {{ env = "X_AT" }}, access_token_secret = {{ env = "X_ATS" }}, partner_key = {{ env = "X_PK" }} }}
retry = {{ max_attempts = 3, schedule = [0.5], jitter = 0, max_age_seconds = 600 }}
timeout = {{ connect = 2, read = 3 }}
[[destination.routes]]
type = "install"
[[destination.routes]]
type = "event"

[[destination]]
name = "net"
kind = "templated"
url = "{base_url}/net?e=(event-name)"
[[destination.routes]]
type = "event"
events = ["af_custom_unmapped"]
"""


def install(event_id: str = "x-install-1", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "app_id": "id333903271",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2026-11-22T11:00:00.123+01:00",
        "idfa": IDFA,
        "ip": "192.133.78.1",
        **extra,
    }


def purchase(event_id: str = "x-purchase-1", n: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "app_id": "com.example.game",
        "platform": "android",
        "event_name": "af_purchase",
        "event_time": "2026-11-22T10:05:00.250Z",
        "gaid": gaid(n),
        "revenue": "4.99",
        "currency": "EUR",
        "event_values": {"af_quantity": 2},
        **extra,
    }


def wait_until(predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@dataclass
class XSetup:
    path: Path
    producer: Producer
    start: Callable[..., WorkerProcess]
    run_cli: Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def sandbox() -> Iterator[SandboxX]:
    with SandboxX(XCredentials(CK, CS, AT, ATS), attribution_share=1.0) as server:
        yield server


@pytest.fixture
def x(
    sandbox: SandboxX,
    redis_url: str,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    start_worker: Callable[..., WorkerProcess],
) -> XSetup:
    path = write_destinations(destinations_toml(sandbox.url))

    def start(**env: str) -> WorkerProcess:
        return start_worker(path, "--queues", "x_mact", "--concurrency", "4", env={**ENV, **env})

    def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            **ENV,
            "POSTBACK_RELAY_REDIS_URL": redis_url,
            "POSTBACK_RELAY_DESTINATIONS_FILE": str(path),
        }
        return subprocess.run(
            [str(CLI), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    return XSetup(path, make_producer(path), start, run_cli)


def records(client: redis.Redis) -> list[dict[str, str]]:
    return list(AttemptLog(client, KEYS, 100_000).iter_records())


def counters(client: redis.Redis) -> dict[str, int]:
    raw = client.hgetall(KEYS.metrics_counters())
    return {k.decode(): int(v) for k, v in raw.items()}


def log_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in worker.log().splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            lines.append(parsed)
    return lines


def by_hash(requests_: list[XRequest]) -> dict[str, list[XRequest]]:
    grouped: dict[str, list[XRequest]] = {}
    for req in requests_:
        grouped.setdefault(req.params.get("hashed_device_id", ""), []).append(req)
    return grouped


# --- 1. delivered, attribution stored -----------------------------------------------------------


def test_install_and_purchase_are_delivered_with_attribution_stored(
    x: XSetup, sandbox: SandboxX, redis_client: redis.Redis
) -> None:
    worker = x.start()
    (install_id,) = x.producer.produce(install()).accepted
    (purchase_id,) = x.producer.produce(purchase()).accepted
    assert install_id == delivery_id_for("x-install-1", "x")
    assert purchase_id == delivery_id_for("x-purchase-1", "x")

    got = wait_until(lambda: len(records(redis_client)) >= 2)
    assert got, worker.log()[-3000:]
    time.sleep(0.5)  # nothing more may arrive
    # 200 from SandboxX means oauthlib's server side accepted the signature.
    assert sorted(r.status for r in sandbox.requests) == [200, 200], worker.log()[-3000:]
    sent = {r.params["conversion_type"]: r for r in sandbox.requests}
    assert set(sent) == {"INSTALL", "PURCHASE"}
    assert all(r.method == "POST" and r.path == "/12/conversion_event" for r in sent.values())
    assert sent["INSTALL"].params == {
        "app_id": "333903271",
        "conversion_time": "2026-11-22T10:00:00.123Z",
        "conversion_type": "INSTALL",
        "hashed_device_id": hashed(IDFA),
        "os_type": "IOS",
        "click_window": "14",
        "view_through_window": "1",
        "device_ip_address": "192.133.78.1",
    }
    assert sent["PURCHASE"].params == {
        "app_id": "com.example.game",
        "conversion_time": "2026-11-22T10:05:00.250Z",
        "conversion_type": "PURCHASE",
        "hashed_device_id": hashed(gaid(1)),
        "os_type": "ANDROID",
        "click_window": "14",
        "view_through_window": "1",
        "price_micro": "4990000",
        "price_currency": "EUR",
        "number_items": "2",
    }
    for req in sent.values():
        assert req.headers["Authorization"].startswith("OAuth ")

    recs = records(redis_client)
    assert len(recs) == 2
    by_id = {r["delivery_id"]: r for r in recs}
    assert set(by_id) == {install_id, purchase_id}
    for record in recs:
        assert record["notifying_status"] == "sent"
        assert record["response_code"] == "200"
        assert record["destination"] == "x"
        assert record["attempt"] == "1"
        assert record["postback_method"] == "POST"
        assert record["postback_url"].startswith(f"{sandbox.url}/12/conversion_event?")
        attribution = json.loads(record["attribution"])
        assert set(attribution) == {"twitter_attribution", "tpn_attribution"}
        assert attribution["tpn_attribution"] is None
        twitter = attribution["twitter_attribution"]
        assert twitter["attribution_type"] == "DIRECT"
        assert twitter["promoted_properties"]["campaign_id"] == "sandbox-campaign"
    assert json.loads(by_id[install_id]["attribution"])["twitter_attribution"][
        "engagement_time"
    ] == ("2026-11-22T10:00:00.123Z")
    assert DeadLetterStore(redis_client, KEYS).count() == 0
    assert counters(redis_client) == {"x|delivered": 2}

    shown = x.run_cli("attempts", "show", install_id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == by_id[install_id]
    assert "twitter_attribution" in shown.stdout

    exported = x.run_cli("attempts", "export", "--format", "json", "-d", "x")
    assert exported.returncode == 0, exported.stderr
    assert len(json.loads(exported.stdout)["data"]) == 2

    everything = worker.log() + json.dumps(recs) + shown.stdout + shown.stderr + exported.stdout
    for secret in SECRETS:
        assert secret not in everything


# --- 2. wrong secret: permanent failure, pause, resume -----------------------------------------


def test_wrong_secret_dead_letters_once_pauses_and_resume_lifts_it(
    x: XSetup, sandbox: SandboxX, redis_client: redis.Redis
) -> None:
    worker = x.start(X_CS=WRONG_CS)
    store = DeadLetterStore(redis_client, KEYS)
    pauses = PauseRegistry(redis_client, KEYS)
    (first,) = x.producer.produce(purchase("wrong-1", n=1)).accepted

    entry = wait_until(lambda: store.get(first))
    assert entry is not None, worker.log()[-3000:]
    assert entry.status == 401
    assert "UNAUTHORIZED_ACCESS" in entry.reason
    assert entry.envelope is not None
    assert len(entry.envelope.history) == 1
    assert [r.status for r in sandbox.requests] == [401]
    until = pauses.paused_until("x")
    assert until is not None
    assert until > time.time() + 3600  # a credentials pause lasts until an operator acts

    alarms = wait_until(lambda: [line for line in log_lines(worker) if line.get("alarm") is True])
    assert alarms, worker.log()[-3000:]
    assert {line["event"] for line in alarms} & {"destination.auth_failed", "destination.paused"}

    # While paused, nothing is sent: the next delivery waits in the delay set, no attempt spent.
    (second,) = x.producer.produce(purchase("wrong-2", n=2)).accepted
    delayed = KEYS.delayed(X_QUEUE)
    assert wait_until(lambda: redis_client.zcard(delayed) == 1), worker.log()[-3000:]
    time.sleep(1.0)
    assert len(sandbox.requests) == 1
    assert store.count() == 1
    assert store.get(second) is None
    assert redis_client.zcard(delayed) == 1
    recs = records(redis_client)
    assert [(r["delivery_id"], r["notifying_status"], r["response_code"]) for r in recs] == [
        (first, "failed", "401")
    ]
    assert counters(redis_client) == {"x|dead_lettered": 1, "x|deferred": 1}

    # Stop the worker with the wrong secret first: the held delivery is released on resume
    # and would otherwise be sent (and refused) again at once.
    worker.stop()
    resumed = x.run_cli("destinations", "resume", "x")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "x: resumed; 1 held delivery(ies) released"
    assert pauses.paused_until("x") is None
    again = x.run_cli("destinations", "resume", "x")
    assert again.stdout.strip().startswith("x: was not paused;")

    shown = x.run_cli("dlq", "show", first)
    assert shown.returncode == 0, shown.stderr
    everything = worker.log() + json.dumps(recs) + shown.stdout + entry.model_dump_json()
    for secret in SECRETS:
        assert secret not in everything


def test_deliveries_held_by_a_401_pause_go_out_after_resume(
    x: XSetup, sandbox: SandboxX, redis_client: redis.Redis
) -> None:
    bad = x.start(X_CS=WRONG_CS)
    store = DeadLetterStore(redis_client, KEYS)
    (first,) = x.producer.produce(purchase("held-1", n=1)).accepted
    assert wait_until(lambda: store.get(first)), bad.log()[-3000:]
    x.producer.produce(purchase("held-2", n=2))
    assert wait_until(lambda: redis_client.zcard(KEYS.delayed(X_QUEUE)) == 1)
    bad.stop()

    x.start()  # credentials fixed
    assert x.run_cli("destinations", "resume", "x").stdout.strip().startswith("x: resumed;")
    wait_until(lambda: any(r.status == 200 for r in sandbox.requests), timeout=8)
    assert [r.status for r in sandbox.requests] == [401, 200]
    assert sandbox.requests[1].params["hashed_device_id"] == hashed(gaid(2))


# --- 3. 429 with x-rate-limit-reset: paused, then resumed --------------------------------------

# A request that had already passed the pause check when the 429 came back may still arrive
# shortly after it: allow those (at most the other burst events) within IN_FLIGHT seconds.
IN_FLIGHT = 1.0
# The pause ends at the reset time computed from the header; float rounding only.
RESET_EPS = 0.1


@pytest.mark.timeout(90)
def test_429_with_reset_pauses_the_destination_until_the_reset(
    x: XSetup, sandbox: SandboxX, redis_client: redis.Redis
) -> None:
    worker = x.start()
    pauses = PauseRegistry(redis_client, KEYS)
    reset = int(time.time()) + 6
    sandbox.fail_next(
        429,
        1,
        code="TOO_MANY_REQUESTS",
        headers={"x-rate-limit-remaining": "0", "x-rate-limit-reset": str(reset)},
    )
    burst = {n: x.producer.produce(purchase(f"burst-{n}", n=n)).accepted[0] for n in range(5)}

    limited = wait_until(lambda: [r for r in sandbox.requests if r.status == 429])
    assert limited, worker.log()[-3000:]
    t429 = limited[0].at
    assert wait_until(lambda: pauses.paused_until("x") is not None, timeout=5)
    assert time.time() < reset - 1, "the 429 came too late to test the pause window"
    # Events produced while paused must wait for the reset too.
    late = {n: x.producer.produce(purchase(f"late-{n}", n=n)).accepted[0] for n in range(10, 13)}

    expected = {hashed(gaid(n)) for n in [*burst, *late]}
    assert wait_until(
        lambda: (
            {r.params["hashed_device_id"] for r in sandbox.requests if r.status == 200} == expected
        ),
        timeout=40,
    ), worker.log()[-3000:]
    time.sleep(0.5)
    seen = list(sandbox.requests)
    assert [r.status for r in seen].count(429) == 1
    assert len([r for r in seen if r.status == 200]) == 8
    assert all(len(reqs) in {1, 2} for reqs in by_hash(seen).values())

    in_window = [r for r in seen if t429 < r.at < reset - RESET_EPS]
    assert all(r.at <= t429 + IN_FLIGHT for r in in_window), [(r.at - t429) for r in in_window]
    late_hashes = {hashed(gaid(n)) for n in late}
    assert not [r for r in in_window if r.params["hashed_device_id"] in late_hashes]
    assert len(in_window) <= 4
    for reqs in (by_hash(seen)[h] for h in late_hashes):
        assert [r.status for r in reqs] == [200]
        assert reqs[0].at >= reset - RESET_EPS
    limited_hash = limited[0].params["hashed_device_id"]
    assert [r.status for r in by_hash(seen)[limited_hash]] == [429, 200]
    assert by_hash(seen)[limited_hash][1].at >= reset - RESET_EPS

    # Deferral spent no attempt: one record per delivery, two for the one that got the 429.
    recs = records(redis_client)
    per_delivery: dict[str, list[str]] = {}
    for record in recs:
        per_delivery.setdefault(record["delivery_id"], []).append(record["response_code"])
    assert len(recs) == 9
    limited_id = next(burst[n] for n in burst if hashed(gaid(n)) == limited_hash)
    assert per_delivery[limited_id] == ["429", "200"]
    for delivery_id in [*burst.values(), *late.values()]:
        if delivery_id != limited_id:
            assert per_delivery[delivery_id] == ["200"]
    assert DeadLetterStore(redis_client, KEYS).count() == 0
    stats = counters(redis_client)
    assert stats["x|delivered"] == 8
    assert stats["x|retry_scheduled"] == 1
    assert stats.get("x|deferred", 0) >= 3
    assert pauses.paused_until("x") is None


# --- the server-announced budget (x-rate-limit-remaining) holds sends back without a 429 --------


@pytest.mark.timeout(90)
def test_remaining_budget_from_headers_holds_sends_until_the_reset(
    x: XSetup, sandbox: SandboxX, redis_client: redis.Redis
) -> None:
    worker = x.start()
    sandbox.rate_limit, sandbox.rate_window = 3, 4.0
    with sandbox._lock:  # start the sandbox's window now, not when the fixture built it
        sandbox._window_start, sandbox._used = time.time(), 0

    def ok() -> list[XRequest]:
        return [r for r in sandbox.requests if r.status == 200]

    # One at a time, so each answer's x-rate-limit-remaining is in Redis before the next send.
    for n in range(3):
        x.producer.produce(purchase(f"budget-{n}", n=20 + n))
        assert wait_until(lambda n=n: len(ok()) == n + 1), worker.log()[-3000:]
    budget_key = KEYS.server_budget("x")
    assert wait_until(lambda: redis_client.get(budget_key) == b"0")
    reset_at = time.time() + redis_client.pttl(budget_key) / 1000
    assert reset_at > time.time() + 1

    (held,) = x.producer.produce(purchase("budget-3", n=23)).accepted
    assert wait_until(lambda: len(ok()) == 4, timeout=30), worker.log()[-3000:]
    time.sleep(0.3)
    seen = list(sandbox.requests)
    assert [r.status for r in seen] == [200, 200, 200, 200]  # never a 429: the budget held it
    assert seen[3].params["hashed_device_id"] == hashed(gaid(23))
    assert seen[3].at >= reset_at - RESET_EPS
    assert counters(redis_client).get("x|deferred", 0) >= 1
    assert counters(redis_client)["x|delivered"] == 4
    held_records = [r for r in records(redis_client) if r["delivery_id"] == held]
    assert [(r["attempt"], r["notifying_status"]) for r in held_records] == [("1", "sent")]


# --- 4. skipped and unmapped events ------------------------------------------------------------


def test_no_device_id_is_skipped_and_unmapped_events_never_reach_the_x_queue(
    x: XSetup, sandbox: SandboxX, redis_client: redis.Redis
) -> None:
    unmapped = purchase("unmapped-1", n=9, event_name="af_custom_unmapped")
    accepted = x.producer.produce(unmapped).accepted
    assert accepted == [delivery_id_for("unmapped-1", "net")]  # templated only, never x
    assert redis_client.llen(X_QUEUE) == 0
    assert redis_client.llen(queue_for("templated")) == 1
    unrouted = x.producer.produce(purchase("unrouted-1", n=8, event_name="af_nobody_wants"))
    assert unrouted.accepted == []

    worker = x.start()
    ids = [
        *x.producer.produce(
            install("no-idfa", idfa=None, idfv="11111111-2222-3333-4444-555555555555")
        ).accepted,
        *x.producer.produce(purchase("no-gaid", gaid=None, oaid="0123456789abcdef0123")).accepted,
        *x.producer.produce(purchase("control", n=3)).accepted,
    ]
    assert ids == [
        delivery_id_for("no-idfa", "x"),
        delivery_id_for("no-gaid", "x"),
        delivery_id_for("control", "x"),
    ]
    want = {"x|skipped": 2, "x|delivered": 1}
    assert wait_until(lambda: counters(redis_client) == want), (
        counters(redis_client),
        worker.log()[-3000:],
    )
    time.sleep(1.0)  # nothing else may happen
    assert counters(redis_client) == want
    assert [r.params["hashed_device_id"] for r in sandbox.requests] == [hashed(gaid(3))]
    assert DeadLetterStore(redis_client, KEYS).count() == 0
    assert [r["delivery_id"] for r in records(redis_client)] == [delivery_id_for("control", "x")]
    assert redis_client.llen(X_QUEUE) == 0
    assert redis_client.zcard(KEYS.delayed(X_QUEUE)) == 0
    assert redis_client.llen(queue_for("templated")) == 1  # no templated worker runs here
    skipped = [line for line in log_lines(worker) if line.get("event") == "delivery.skipped"]
    assert len(skipped) == 2
    assert all("device id" in line["reason"] for line in skipped)


# --- never silent loss ----------------------------------------------------------------------------


def test_an_event_that_breaks_the_adapter_is_delivered_or_dead_lettered_never_lost(
    x: XSetup, sandbox: SandboxX, redis_client: redis.Redis
) -> None:
    worker = x.start()
    (odd,) = x.producer.produce(
        purchase("odd-quantity", n=4, event_values={"af_quantity": "²"})
    ).accepted
    x.producer.produce(purchase("plain", n=5))
    store = DeadLetterStore(redis_client, KEYS)

    def delivered() -> set[str]:
        return {r.params["hashed_device_id"] for r in sandbox.requests if r.status == 200}

    assert wait_until(lambda: hashed(gaid(5)) in delivered()), worker.log()[-3000:]
    wait_until(lambda: store.get(odd) is not None or hashed(gaid(4)) in delivered(), timeout=6)
    assert store.get(odd) is not None or hashed(gaid(4)) in delivered()
