"""The API (workers/api/) in this process, over FastAPI's TestClient and the suite's real Redis:
every answer of POST /v1/events with what it enqueued, the clients file, the OpenAPI document,
the metrics it adds to the endpoint's, and logs without tokens or bodies. Real processes (a
started `postback-relay api`, a worker, Redis killed): tests/integration/test_api.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from click.testing import CliRunner
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from config.api_clients import ApiClient, load_api_clients
from config.destination_base import ConfigError
from config.destinations import load_destinations
from config.keys import RedisKeys
from config.settings import Settings
from schemas.errors import InvalidEvent
from schemas.event import ConversionEvent
from workers.api import ingest
from workers.api.app import create_api
from workers.api.auth import limit_key
from workers.cli.main import main as cli_main
from workers.dev.embedded_redis import free_port
from workers.metrics import RedisStateCollector

QUEUE = "postback.templated"
TOKEN = "go-backend-t0ken-0123456789"
OTHER = "node-backend-t0ken-0123456789"
IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
KEYS = RedisKeys("pr")


def event(event_id: str, app_id: str = "id123456789", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id, "app_id": app_id, "platform": "ios", "event_name": "install",
        "event_time": "2026-11-22T10:00:00Z", "idfa": IDFA, **extra,
    }  # fmt: skip


def clients_file(tmp_path: Path, text: str, **env: str) -> list[ApiClient]:
    path = tmp_path / "clients.toml"
    path.write_text(text)
    return load_api_clients(path, env)


CLIENTS = """
[[client]]
name = "go"
token = { env = "TOK_GO" }
app_ids = ["123456789"]
[[client]]
name = "node"
token = { env = "TOK_NODE" }
rate_limit = "2/minute"
"""


@pytest.fixture
def make_api(
    redis_url: str, redis_client: redis.Redis, net_destination: Path, tmp_path: Path
) -> Callable[..., Any]:
    @contextmanager
    def make(url: str = redis_url, **settings: Any) -> Iterator[TestClient]:
        conf = Settings(redis_url=url, destinations_file=net_destination, **settings)
        clients = clients_file(tmp_path, CLIENTS, TOK_GO=TOKEN, TOK_NODE=OTHER)
        app = create_api(conf, load_destinations(net_destination), clients)
        with TestClient(app) as client:
            client.headers["Authorization"] = f"Bearer {TOKEN}"
            yield client

    return make


def enqueued(client: redis.Redis) -> tuple[int, int]:
    """(messages on the queue, deliveries in the ledger)."""
    return client.llen(QUEUE), client.zcard(KEYS.ledger())


def test_one_event_is_accepted_and_its_replay_enqueues_nothing_new(
    make_api: Callable[..., Any], redis_client: redis.Redis
) -> None:
    with make_api() as api:
        first = api.post("/v1/events", json=event("e-1"))
        assert first.status_code == 202, first.text
        (result,) = first.json()["results"]
        assert result["status"] == "accepted"
        (delivery_id,) = result["delivery_ids"]
        assert enqueued(redis_client) == (1, 1)
        again = api.post("/v1/events", json=[event("e-1")])
    assert again.status_code == 202
    assert again.json()["results"][0]["status"] == "duplicate"
    assert again.json()["results"][0]["duplicates"] == [delivery_id]
    assert again.json()["accepted"] == 0
    assert enqueued(redis_client) == (1, 1)


def test_invalid_items_are_named_as_invalid_event_names_them_and_the_valid_ones_accepted(
    make_api: Callable[..., Any], redis_client: redis.Redis
) -> None:
    bad = event("e-bad", platform="web", country="XX")
    with make_api() as api:
        answer = api.post("/v1/events", json=[event("e-1"), bad, 42, event("e-2")])
    assert answer.status_code == 422
    body = answer.json()
    assert (body["accepted"], body["invalid"]) == (2, 2)
    statuses = [(r["index"], r["status"]) for r in body["results"]]
    assert statuses == [(0, "accepted"), (1, "invalid"), (2, "invalid"), (3, "accepted")]
    with pytest.raises(InvalidEvent) as expected:
        ConversionEvent.parse(bad)
    assert body["results"][1]["error"] == str(expected.value)
    assert body["results"][1]["errors"] == expected.value.errors
    assert body["results"][1]["event_id"] == "e-bad"
    assert body["results"][2]["error"] == "invalid event: expected a dict, got int"
    assert enqueued(redis_client) == (2, 2)


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"{not json", 400), (b'"an event"', 400), (b"[]", 400), (b"\xff\xfe", 400)],
)
def test_a_body_that_is_no_event_or_array_is_refused(
    make_api: Callable[..., Any], redis_client: redis.Redis, body: bytes, status: int
) -> None:
    with make_api() as api:
        answer = api.post("/v1/events", content=body)
    assert answer.status_code == status
    assert answer.json()["error"]
    assert enqueued(redis_client) == (0, 0)


def test_too_many_events_or_bytes_are_refused_whole(
    make_api: Callable[..., Any], redis_client: redis.Redis
) -> None:
    with make_api(api_max_items=3, api_max_body_bytes=2048) as api:
        many = api.post("/v1/events", json=[event(f"e-{i}") for i in range(4)])
        big = api.post("/v1/events", json=event("e-big", user_agent="x" * 1000, campaign="y" * 256,
                                                 event_values={"k": "z" * 900}))  # fmt: skip
        chunked = api.post("/v1/events", content=iter([b"[" + b" " * 2048, b"]"]))
        fits = api.post("/v1/events", json=[event(f"e-{i}") for i in range(3)])
    assert many.status_code == 413
    assert "at most 3" in many.json()["error"]
    assert big.status_code == 413
    assert "over 2048 bytes" in big.json()["error"]
    assert chunked.status_code == 413  # no Content-Length: counted while read
    assert fits.status_code == 202
    assert enqueued(redis_client) == (3, 3)


def test_no_token_is_401_a_wrong_one_403(
    make_api: Callable[..., Any], redis_client: redis.Redis
) -> None:
    with make_api() as api:
        missing = api.post("/v1/events", json=event("e-1"), headers={"Authorization": ""})
        basic = api.post("/v1/events", json=event("e-1"), headers={"Authorization": "Basic eDp5"})
        wrong = api.post("/v1/events", json=event("e-1"), headers={"Authorization": "Bearer x" * 3})
        prefix = api.post("/v1/events", json=event("e-1"),
                          headers={"Authorization": f"Bearer {TOKEN[:-1]}"})  # fmt: skip
    assert (missing.status_code, basic.status_code) == (401, 401)
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert (wrong.status_code, prefix.status_code) == (403, 403)
    assert enqueued(redis_client) == (0, 0)


def test_an_event_of_another_app_refuses_the_whole_request(
    make_api: Callable[..., Any], redis_client: redis.Redis
) -> None:
    with make_api() as api:
        answer = api.post(
            "/v1/events",
            json=[event("e-1"), event("e-2", app_id="id999"), event("e-3", app_id="id123456789")],
        )
        other_client = api.post("/v1/events", json=event("e-4", app_id="id999"),
                                 headers={"Authorization": f"Bearer {OTHER}"})  # fmt: skip
    assert answer.status_code == 403
    assert answer.json()["items"] == [{"index": 1, "app_id": "id999"}]
    assert "nothing of the request was enqueued" in answer.json()["error"]
    assert other_client.status_code == 202  # a client without app_ids sends for every app
    assert enqueued(redis_client) == (1, 1)


def test_over_the_rate_limit_is_429_and_spends_no_slot(
    make_api: Callable[..., Any], redis_client: redis.Redis
) -> None:
    node = {"Authorization": f"Bearer {OTHER}"}
    key = KEYS.rate_limit(limit_key(ApiClient("node", None, None, None)))  # type: ignore[arg-type]
    with make_api() as api:
        answers = [api.post("/v1/events", json=event(f"e-{i}"), headers=node) for i in range(2)]
        taken = redis_client.get(key)
        refused = [api.post("/v1/events", json=event(f"r-{i}"), headers=node) for i in range(3)]
        other = api.post("/v1/events", json=event("e-go"))  # another client's own limit
    assert [a.status_code for a in answers] == [202, 202]
    assert [a.status_code for a in refused] == [429, 429, 429]
    assert all(1 <= int(a.headers["Retry-After"]) <= 30 for a in refused)
    assert redis_client.get(key) == taken  # the refused requests moved nothing
    assert other.status_code == 202
    assert enqueued(redis_client) == (3, 3)


def test_a_queue_deeper_than_the_bound_is_503_with_retry_after(
    make_api: Callable[..., Any], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "DEPTH_MAX_AGE", 0.0)
    with make_api(api_max_queue_depth=2) as api:
        first = api.post("/v1/events", json=[event(f"e-{i}") for i in range(3)])
        refused = api.post("/v1/events", json=event("e-late"))
        redis_client.delete(QUEUE)  # the workers drained it
        later = api.post("/v1/events", json=event("e-late"))
    assert first.status_code == 202
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == str(ingest.RETRY_AFTER_BACKPRESSURE)
    assert QUEUE in refused.json()["error"]
    assert later.status_code == 202
    assert redis_client.zcard(KEYS.ledger()) == 4


def test_redis_unreachable_is_503_and_not_ready(make_api: Callable[..., Any]) -> None:
    with make_api(url=f"redis://127.0.0.1:{free_port()}/0", redis_connect_timeout=0.5) as api:
        answer = api.post("/v1/events", json=event("e-1"))
        ready = api.get("/readyz")
        alive = api.get("/healthz")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == str(ingest.RETRY_AFTER_UNAVAILABLE)
    assert "retry with the same event_id" in answer.json()["error"]
    assert (ready.status_code, alive.status_code) == (503, 200)


def test_the_openapi_document_validates_and_describes_the_event(
    make_api: Callable[..., Any],
) -> None:
    with make_api() as api:
        document = api.get("/openapi.json").json()
        assert api.get("/readyz").status_code == 200
    validate(document)
    post = document["paths"]["/v1/events"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    single, array = schema["oneOf"]
    assert set(single["required"]) == {"app_id", "platform", "event_name", "event_time"}
    assert array["maxItems"] == Settings().api_max_items
    assert {"202", "400", "401", "403", "413", "422", "429", "503"} <= set(post["responses"])
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_requests_are_counted_on_the_metrics_endpoint(
    make_api: Callable[..., Any], redis_client: redis.Redis, net_destination: Path
) -> None:
    with make_api() as api:
        api.post("/v1/events", json=[event("e-1"), event("e-2"), {"app_id": 1}])
        api.post("/v1/events", json=event("e-1"))
        api.post("/v1/events", json=event("e-1"), headers={"Authorization": ""})
    # The flusher adds the last second's figures at shutdown.
    collector = RedisStateCollector(
        redis_client, KEYS, load_destinations(net_destination), ("templated",)
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        if family.name.startswith("postback_relay_api")
        for s in family.samples
    }
    assert samples[("postback_relay_api_requests_total", (("status", "422"),))] == 1
    assert samples[("postback_relay_api_requests_total", (("status", "202"),))] == 1
    assert samples[("postback_relay_api_requests_total", (("status", "401"),))] == 1
    assert samples[("postback_relay_api_requests_total", (("status", "503"),))] == 0
    events = {
        k[1][0][1]: v for k, v in samples.items() if k[0] == "postback_relay_api_events_total"
    }
    assert events == {"accepted": 2, "duplicate": 1, "rejected": 1}
    assert samples[("postback_relay_api_request_duration_seconds_count", ())] == 3


def test_access_lines_carry_no_token_and_no_body(make_api: Callable[..., Any]) -> None:
    with structlog.testing.capture_logs() as logs, make_api() as api:
        api.post("/v1/events", json=event("e-1"))
        api.post("/v1/events", json=event("e-2"), headers={"Authorization": f"Bearer {OTHER}x"})
    lines = [line for line in logs if line["event"] == "api.request"]
    assert [(line["status"], line["client"]) for line in lines] == [(202, "go"), (403, None)]
    text = json.dumps(logs)
    for secret in (TOKEN, OTHER, IDFA, "e-1"):
        assert secret not in text


def test_the_clients_file_reads_tokens_by_reference(tmp_path: Path) -> None:
    secret_file = tmp_path / "node-token"
    secret_file.write_text(OTHER + "\n")
    clients = clients_file(
        tmp_path,
        CLIENTS.replace('{ env = "TOK_NODE" }', f'{{ file = "{secret_file}" }}'),
        TOK_GO=TOKEN,
    )
    assert [(c.name, c.token.get_secret_value()) for c in clients] == [
        ("go", TOKEN),
        ("node", OTHER),
    ]
    assert clients[0].app_ids == frozenset({"id123456789"})  # as events carry it
    assert clients[1].app_ids is None
    assert TOKEN not in repr(clients)
    assert load_api_clients(None) == []


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (
            CLIENTS,
            {"TOK_GO": TOKEN},
            "client 'node': token: environment variable TOK_NODE is not set",
        ),
        (
            CLIENTS,
            {"TOK_GO": TOKEN, "TOK_NODE": "short"},
            "client 'node': token: at least 16 characters (env TOK_NODE holds 5)",
        ),
        (
            CLIENTS,
            {"TOK_GO": TOKEN, "TOK_NODE": TOKEN},
            "client 'node': token: the same value as another client's",
        ),
        (
            CLIENTS.replace('"node"', '"go"'),
            {"TOK_GO": TOKEN, "TOK_NODE": OTHER},
            "client 'go': a second client of this name",
        ),
        (CLIENTS.replace("2/minute", "often"), {}, "not a rate limit like 100/second"),
        ('[[client]]\nname = "x"\ntoken = "inline"\n', {}, "client.0.token"),
        ("[[token]]\n", {}, "token: Extra inputs are not permitted"),
    ],
)
def test_a_wrong_clients_file_is_refused_naming_the_client_and_the_reference(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        clients_file(tmp_path, text, **env)
    assert message in str(refused.value)
    assert TOKEN not in str(refused.value)


def test_check_config_reads_the_clients_tokens(tmp_path: Path, net_destination: Path) -> None:
    path = tmp_path / "clients.toml"
    path.write_text(CLIENTS)
    env = {
        "POSTBACK_RELAY_DESTINATIONS_FILE": str(net_destination),
        "POSTBACK_RELAY_API_CLIENTS_FILE": str(path),
        "TOK_GO": TOKEN,
        "TOK_NODE": OTHER,
    }
    ok = CliRunner().invoke(cli_main, ["check-config"], env=env)
    assert ok.exit_code == 0, ok.output
    assert f"{path}: 2 API client(s) OK" in ok.output
    assert "go                       apps: id123456789  rate_limit=-" in ok.output
    assert "node                     apps: every app  rate_limit=2 per 1 minute" in ok.output
    missing = CliRunner().invoke(cli_main, ["check-config"], env={**env, "TOK_NODE": ""})
    assert missing.exit_code == 2
    assert "client 'node': token: environment variable TOK_NODE is not set" in missing.output
    assert TOKEN not in ok.output + missing.output
