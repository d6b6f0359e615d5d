"""Which process reads which secret: loading the destinations file reads none, with_secrets reads
those of what a process sends to, and check-config says who needs each (ARCHITECTURE rule 9)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from config.destination_base import ConfigError, SecretsNotResolved
from config.destinations import load_destinations
from config.keys import queue_for
from config.kinds.x_mact import X_CREDENTIALS
from config.settings import Settings
from schemas.event import ConversionEvent
from tests.helpers import INSTALL, one_of_each_kind
from workers.cli.context import CliContext
from workers.cli.main import main
from workers.logging import redactor

PARTNER_KEY = "partner-k3y-5e1f"
X_ENV = {
    "X_CONSUMER_KEY": "ck-0123456789",
    "X_CONSUMER_SECRET": "cs-0123456789",
    "X_ACCESS_TOKEN": "at-0123456789",
    "X_ACCESS_TOKEN_SECRET": "ats-0123456789",
    "X_PARTNER_KEY": "cGFydG5lci1rZXk=",
}
APPMETRICA_TOKEN = "am-token-9f8e7d"
ALL_SECRETS = {"PARTNER_API_KEY": PARTNER_KEY, "APPMETRICA_TOKEN": APPMETRICA_TOKEN, **X_ENV}


@pytest.fixture
def xmp_token_file(tmp_path: Path) -> Path:
    return tmp_path / "xmp_token"  # not written: tests that need it write it


@pytest.fixture
def path(tmp_path: Path, xmp_token_file: Path) -> Path:
    path = tmp_path / "destinations.toml"
    path.write_text(one_of_each_kind("https://partner.example", xmp_token_file))
    return path


@pytest.fixture
def no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ALL_SECRETS:
        monkeypatch.delenv(var, raising=False)


def cli(
    path: Path, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> tuple[int, str]:
    """Run the command in this process, with no partner secret in the environment but ``env``."""
    environ: dict[str, str | None] = {var: None for var in ALL_SECRETS}
    environ |= {"POSTBACK_RELAY_DESTINATIONS_FILE": str(path), **(env or {})}
    result = CliRunner().invoke(main, list(args), input=stdin, env=environ)
    return result.exit_code, result.output


# --- loading reads no secret --------------------------------------------------------------------


def test_loading_reads_no_secret_and_routes(path: Path, no_secrets: None) -> None:
    destinations = load_destinations(path)  # no variable set, no secret file: still loads
    install = ConversionEvent.parse(INSTALL)
    assert [d.name for d, _ in destinations.routes_for(install)] == ["x", "partner"]
    assert destinations.secrets_held() == []


def test_using_a_secret_that_was_not_read_fails_loudly(path: Path) -> None:
    destinations = load_destinations(path)
    partner = destinations.get("partner")
    with pytest.raises(SecretsNotResolved, match="destination 'partner'"):
        partner.secret("api_key")
    with pytest.raises(SecretsNotResolved, match="destination 'partner'"):
        partner.secret_values()
    with pytest.raises(SecretsNotResolved, match="reconcile 'main'"):
        destinations.reconcile["main"].token_value()
    assert partner.secrets_to_mask() == []  # masking needs nothing the process never read


def test_with_secrets_reads_only_what_is_asked(path: Path) -> None:
    loaded = load_destinations(path)
    templated = loaded.with_secrets({"PARTNER_API_KEY": PARTNER_KEY}, kinds=["templated"])
    assert templated.get("partner").secret("api_key") == PARTNER_KEY
    assert templated.secrets_held() == [PARTNER_KEY]
    with pytest.raises(SecretsNotResolved):
        templated.get("x").secret("consumer_key")
    with pytest.raises(SecretsNotResolved):
        templated.reconcile["main"].token_value()
    # The loaded view is not changed: what a producer holds never gains a secret.
    with pytest.raises(SecretsNotResolved):
        loaded.get("partner").secret("api_key")

    # The reconciler runs on the redeliver queue: its workers read the AppMetrica token.
    redeliver = loaded.with_secrets({"APPMETRICA_TOKEN": APPMETRICA_TOKEN}, kinds=["redeliver"])
    assert redeliver.reconcile["main"].token_value() == APPMETRICA_TOKEN
    assert redeliver.secrets_held() == [APPMETRICA_TOKEN]

    one = loaded.with_secrets(X_ENV, destinations=["x"])
    assert one.get("x").secret_values() == {n: X_ENV[f"X_{n.upper()}"] for n in X_CREDENTIALS}
    with pytest.raises(SecretsNotResolved):
        one.get("partner").secret("api_key")


@pytest.mark.parametrize(
    ("kinds", "environ", "expected"),
    [
        (["templated"], {}, ["destination 'partner'", "credentials.api_key", "PARTNER_API_KEY"]),
        (["x_mact"], {}, ["destination 'x'", "credentials.consumer_key", "X_CONSUMER_KEY"]),
        (["xmp"], {}, ["destination 'xmp'", "credentials.xmp_token", "secret file"]),
        (["redeliver"], {}, ["reconcile 'main'", "token", "APPMETRICA_TOKEN"]),
        (["x_mact"], {**X_ENV, "X_PARTNER_KEY": "not base64!"}, ["credentials.partner_key"]),
    ],
)
def test_a_secret_that_cannot_be_read_names_the_destination_and_the_variable(
    path: Path, kinds: list[str], environ: dict[str, str], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_destinations(path).with_secrets(environ, kinds=kinds)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message
    for value in environ.values():
        assert value not in message


def test_secret_uses_say_which_kind_sends_with_each(path: Path, xmp_token_file: Path) -> None:
    uses = load_destinations(path).secret_uses()
    assert [(u.owner, u.field, u.ref.describe(), u.kind) for u in uses] == [
        *[
            ("destination 'x'", f"credentials.{name}", f"env X_{name.upper()}", "x_mact")
            for name in X_CREDENTIALS
        ],
        ("destination 'partner'", "credentials.api_key", "env PARTNER_API_KEY", "templated"),
        ("destination 'xmp'", "credentials.xmp_token", f"file {xmp_token_file}", "xmp"),
        ("reconcile 'main'", "token", "env APPMETRICA_TOKEN", "redeliver"),
    ]


# --- the processes --------------------------------------------------------------------------------


@pytest.fixture
def restored_redactor() -> Iterator[None]:
    known = set(redactor._secrets)
    yield
    redactor._secrets.intersection_update(known)


def test_a_process_that_reads_secrets_registers_them_for_redaction(
    path: Path, restored_redactor: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = f"GET https://partner.example/pb?key={PARTNER_KEY}"
    assert redactor(None, "info", {"event": line})["event"] == line
    monkeypatch.setenv("PARTNER_API_KEY", PARTNER_KEY)
    CliContext(Settings(destinations_file=path)).sending(kinds=["templated"])
    assert (
        redactor(None, "info", {"event": line})["event"] == "GET https://partner.example/pb?key=***"
    )


def test_produce_command_needs_no_partner_secret(
    path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    code, output = cli(
        path, "produce", env={"POSTBACK_RELAY_REDIS_URL": redis_url}, stdin=json.dumps(INSTALL)
    )
    assert code == 0, output
    assert len(json.loads(output)["accepted"]) == 2
    assert redis_client.llen(queue_for("templated")) == 1
    assert redis_client.llen(queue_for("x_mact")) == 1


@pytest.mark.parametrize(
    ("queues", "expected"),
    [
        ("templated", ["destination 'partner'", "PARTNER_API_KEY"]),
        ("redeliver", ["reconcile 'main'", "APPMETRICA_TOKEN"]),
        ("xmp", ["destination 'xmp'", "xmp_token"]),
    ],
)
def test_worker_refuses_to_start_without_a_secret_of_its_queues(
    path: Path, queues: str, expected: list[str]
) -> None:
    # Every other kind's secrets are there: only the ones this worker sends with count.
    others = {k: v for k, v in ALL_SECRETS.items() if not any(k in e for e in expected)}
    code, output = cli(path, "worker", "--pool", "threads", "--queues", queues, env=others)
    assert code == 2, output
    for part in expected:
        assert part in output
    for value in others.values():
        assert value not in output


def test_check_config_says_which_process_needs_each_secret(
    path: Path, xmp_token_file: Path
) -> None:
    code, output = cli(path, "check-config", env={"PARTNER_API_KEY": PARTNER_KEY})
    assert code == 2, output
    lines = output.splitlines()
    assert (
        "  ok       destination 'partner' credentials.api_key (env PARTNER_API_KEY), "
        "needed by: worker --queues templated"
    ) in lines
    assert (
        "  FAIL     destination 'x' credentials.consumer_key (env X_CONSUMER_KEY), "
        "needed by: worker --queues x_mact, x-check"
    ) in lines
    assert (
        f"  FAIL     destination 'xmp' credentials.xmp_token (file {xmp_token_file}), "
        "needed by: worker --queues xmp, xmp flush"
    ) in lines
    assert (
        "  FAIL     reconcile 'main' token (env APPMETRICA_TOKEN), "
        "needed by: worker --queues redeliver, reconcile"
    ) in lines
    assert (
        f"Error: {path}: reconcile 'main': token: environment variable APPMETRICA_TOKEN is not "
        "set or is empty"
    ) in lines
    assert PARTNER_KEY not in output

    xmp_token_file.write_text("xmp-token-value\n")
    code, output = cli(path, "check-config", env=ALL_SECRETS)
    assert code == 0, output
    assert "FAIL" not in output
    assert sum(line.startswith("  ok ") for line in output.splitlines()) == 8
