"""docker cannot run here, so the compose file, Procfile and example config are checked as data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.destinations import load_destinations
from config.settings import Settings
from workers.app import ALL_KINDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip():
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def test_one_worker_per_destination_queue_in_both_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    procs = procfile()
    for kind in ALL_KINDS:
        name = f"worker-{kind.replace('_', '-')}"
        expected = ["postback-relay", "worker", "--queues", kind]
        assert shlex.split(services[name]["command"]) == expected
        assert shlex.split(procs[name]) == expected
    assert set(procs) == {n for n in services if n != "redis"}
    assert shlex.split(procs["beat"]) == shlex.split(services["beat"]["command"])


def test_redis_persists_and_never_evicts(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    command = redis_service["command"]
    pairs = dict(zip(command[1::2], command[2::2], strict=True))
    assert pairs == {
        "--appendonly": "yes",
        "--appendfsync": "always",
        "--maxmemory-policy": "noeviction",
    }
    assert "redis-data:/data" in redis_service["volumes"]
    assert "redis-data" in compose["volumes"]
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_relay_services_wait_for_redis_and_get_a_grace_period(compose: dict[str, Any]) -> None:
    hard_limit = Settings().task_time_limit
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["POSTBACK_RELAY_REDIS_URL"] == "redis://redis:6379/0"
        grace = int(re.fullmatch(r"(\d+)s", service["stop_grace_period"]).group(1))  # type: ignore[union-attr]
        assert grace > hard_limit, f"{name}: grace {grace}s must exceed the hard limit"
        assert service["build"] == "."


def test_flower_requires_basic_auth_credentials(compose: dict[str, Any]) -> None:
    env = compose["services"]["flower"]["environment"]
    assert env["POSTBACK_RELAY_FLOWER_USER"].startswith("${FLOWER_USER:?")
    assert env["POSTBACK_RELAY_FLOWER_PASSWORD"].startswith("${FLOWER_PASSWORD:?")
    assert "--port 5555" in compose["services"]["flower"]["command"]


def test_no_secret_value_is_written_in_compose() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for line in text.splitlines():
        if re.search(r"(KEY|TOKEN|PASSWORD|SECRET)\w*:", line):
            assert "${" in line, f"secret inline: {line.strip()}"


def test_the_mounted_example_destinations_file_is_valid(tmp_path: Path) -> None:
    example = ROOT / "config" / "destinations.example.toml"
    token = tmp_path / "analytics_token"
    token.write_text("t0ken-value\n")
    text = example.read_text().replace("/run/secrets/analytics_token", str(token))
    copy = tmp_path / "destinations.toml"
    copy.write_text(text)
    destinations = load_destinations(copy).with_secrets(
        {"ADNETWORK_API_KEY": "k3y-value"}, kinds=["templated"]
    )
    assert [d.name for d in destinations] == ["adnetwork-installs", "analytics-purchases"]
    assert destinations.get("analytics-purchases").secret("token") == "t0ken-value"


def test_dockerfile_installs_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("workers", "producers", "schemas", "config"):
        assert f"COPY {package} ./{package}" in text
    assert "pip install --no-cache-dir ." in text


def test_each_worker_has_a_healthcheck_for_its_own_queue(compose: dict[str, Any]) -> None:
    for kind in ALL_KINDS:
        service = compose["services"][f"worker-{kind.replace('_', '-')}"]
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "postback-relay", "health"]
        assert test[test.index("--queue") + 1] == kind
        assert "consumers" in test
        assert "redis" in test
