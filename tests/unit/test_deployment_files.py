"""docker cannot run here, so the compose file, Procfile and example config are checked as data."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from honcho.environ import parse_procfile

from config.kinds import KINDS
from config.settings import VERSION, Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def procfile() -> dict[str, str]:
    """The Procfile as honcho (and foreman) read it."""
    return dict(parse_procfile((ROOT / "Procfile").read_text()).processes)


def test_one_worker_per_destination_queue_in_both_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    procs = procfile()
    for kind in KINDS:
        name = f"worker-{kind.replace('_', '-')}"
        expected = ["postback-relay", "worker", "--queues", kind]
        assert shlex.split(services[name]["command"]) == expected
        assert shlex.split(procs[name]) == expected
    # The Procfile's `web` is compose's `flower`; every other process has the same name.
    assert set(procs) - {"web"} == {n for n in services if n not in {"redis", "flower"}}
    for name in ("beat", "metrics", "api"):
        assert shlex.split(procs[name]) == shlex.split(services[name]["command"])


def test_the_api_serves_on_its_port_with_a_clients_file_of_the_repo(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["api"]
    port = Settings().api_port
    assert shlex.split(service["command"]) == ["postback-relay", "api"]
    assert service["ports"] == [f"{port}:{port}"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    clients_file = mounts[service["environment"]["POSTBACK_RELAY_API_CLIENTS_FILE"]]
    refs = _credential_refs(tomllib.loads((ROOT / clients_file).read_text()))
    assert refs, "the example clients file names a token"
    for ref in refs:  # each token from the host's environment, required
        assert service["environment"][ref["env"]] == f"${{{ref['env']}:?set {ref['env']}}}"


def test_procfile_web_is_flower_on_the_platform_port() -> None:
    # Heroku-like platforms route HTTP only to `web`, on $PORT; Flower keeps its basic auth
    # (the flower command refuses 0.0.0.0 without credentials).
    assert shlex.split(procfile()["web"]) == [
        "postback-relay", "flower", "--address", "0.0.0.0", "--port", "${PORT:-5555}"
    ]  # fmt: skip


def test_metrics_process_serves_on_the_default_port(compose: dict[str, Any]) -> None:
    port = Settings().metrics_port
    assert shlex.split(compose["services"]["metrics"]["command"]) == ["postback-relay", "metrics"]
    assert compose["services"]["metrics"]["ports"] == [f"{port}:{port}"]


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


def test_dockerfile_installs_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("workers", "producers", "schemas", "config"):
        assert f"COPY {package} ./{package}" in text
    assert "pip install --no-cache-dir ." in text


def test_each_worker_has_a_healthcheck_for_its_own_queue(compose: dict[str, Any]) -> None:
    for kind in KINDS:
        service = compose["services"][f"worker-{kind.replace('_', '-')}"]
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "postback-relay", "health"]
        assert test[test.index("--queue") + 1] == kind
        assert "consumers" in test
        assert "redis" in test


def _bind_sources(compose: dict[str, Any]) -> dict[str, str]:
    """Host path -> where it is used, for every bind mount and file-backed secret or config."""
    sources = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                source = volume.get("source", "") if volume.get("type") == "bind" else ""
            else:
                source = volume.split(":", 1)[0]
            if source.startswith((".", "/", "~")):  # otherwise a named volume
                sources[source] = f"services.{name}.volumes"
    for section in ("secrets", "configs"):
        for name, entry in (compose.get(section) or {}).items():
            if "file" in entry:
                sources[entry["file"]] = f"{section}.{name}.file"
    return sources


def test_every_file_the_compose_file_mounts_is_in_the_repo_or_documented_as_yours(
    compose: dict[str, Any],
) -> None:
    # A bind mount of a missing file makes Docker create a directory there, the process fails to
    # read it and `restart: unless-stopped` loops. A file the user must create is named in a
    # comment of the compose file or in the README.
    comments = "\n".join(
        line for line in (ROOT / "docker-compose.yml").read_text().splitlines()
        if line.lstrip().startswith("#")
    )  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    sources = _bind_sources(compose)
    assert sources, "the compose file mounts the destinations file"
    for source, used_in in sources.items():
        documented = source in comments or source in readme
        assert (ROOT / source).is_file() or documented, f"{used_in}: {source} is not in the repo"


def _credential_refs(node: Any) -> list[dict[str, str]]:
    """Every { env = ... } / { file = ... } credential reference in a destinations file."""
    if isinstance(node, dict):
        if set(node) in ({"env"}, {"file"}):
            return [node]
        return [ref for value in node.values() for ref in _credential_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _credential_refs(value)]
    return []


def test_every_credential_of_the_mounted_destinations_file_reaches_each_relay_service(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        env = service["environment"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        destinations = mounts[env["POSTBACK_RELAY_DESTINATIONS_FILE"]]
        refs = _credential_refs(tomllib.loads((ROOT / destinations).read_text()))
        assert refs, "the example file declares credentials"
        secrets = {
            s if isinstance(s, str) else s.get("target", s["source"])
            for s in service.get("secrets", [])
        }
        for ref in refs:
            if "env" in ref:
                assert ref["env"] in env, f"{name}: {ref['env']} is not passed"
                assert env[ref["env"]].startswith(f"${{{ref['env']}:?"), "required, from the host"
            else:
                path = Path(ref["file"])
                assert path.parent == Path("/run/secrets"), f"{name}: {path} is not a secret"
                assert path.name in secrets, f"{name}: no compose secret {path.name}"
                assert "environment" in compose.get("secrets", {})[path.name]


def test_one_version_source_and_typed_packages() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert declared == VERSION
    assert Settings.model_fields["http_user_agent"].default.startswith(
        f"postback-relay/{declared} "
    )
    assert f"## {declared} " in (ROOT / "CHANGELOG.md").read_text()
    for package in ("workers", "producers", "schemas", "config"):
        assert (ROOT / package / "py.typed").is_file(), package
    # ... and every subpackage (workers/broker, workers/kinds/xmp, ...), each shipped in the wheel
    for top in (ROOT / package for package in ("workers", "producers", "schemas", "config")):
        for package_dir in (path.parent for path in top.rglob("__init__.py")):
            assert (package_dir / "py.typed").is_file(), package_dir.relative_to(ROOT)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in package_data["package-data"]["*"]
