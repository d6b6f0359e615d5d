"""Unit tests of config.settings.Settings and workers.logging (redaction, JSON output)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from config.settings import Settings
from workers.logging import REDACTED, SecretRedactor, configure_logging, redactor


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the real environment; start every test from none of our variables."""
    for name in list(os.environ):
        if name.startswith("POSTBACK_RELAY_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


# --- Settings ----------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.destinations_file == Path("config/destinations.toml")
    assert settings.worker_pool == "gevent"
    assert settings.worker_concurrency is None
    assert settings.concurrency == 64  # the gevent pool's default
    assert settings.model_copy(update={"worker_pool": "threads"}).concurrency == 16
    assert settings.model_copy(update={"worker_concurrency": 5}).concurrency == 5
    assert settings.flower_user is None
    assert settings.flower_password is None


def test_reads_prefixed_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_REDIS_URL", "redis://cache:6380/3")
    monkeypatch.setenv("POSTBACK_RELAY_DESTINATIONS_FILE", "/etc/relay/destinations.toml")
    monkeypatch.setenv("POSTBACK_RELAY_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("POSTBACK_RELAY_LOG_FORMAT", "json")
    monkeypatch.setenv("POSTBACK_RELAY_WORKER_CONCURRENCY", "32")
    monkeypatch.setenv("POSTBACK_RELAY_WORKER_POOL", "prefork")
    monkeypatch.setenv("POSTBACK_RELAY_KEY_PREFIX", "relay")
    monkeypatch.setenv("POSTBACK_RELAY_HTTP_READ_TIMEOUT", "5.5")
    settings = Settings()
    assert settings.redis_url == "redis://cache:6380/3"
    assert settings.destinations_file == Path("/etc/relay/destinations.toml")
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "json"
    assert settings.worker_concurrency == 32
    assert settings.worker_pool == "prefork"
    assert settings.key_prefix == "relay"
    assert settings.http_read_timeout == 5.5


def test_unprefixed_names_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "99")
    assert Settings().worker_concurrency is None


def test_invalid_env_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_WORKER_CONCURRENCY", "0")
    with pytest.raises(ValidationError, match="worker_concurrency"):
        Settings()


def test_redis_url_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://platform-redis:6379/1")
    assert Settings().redis_url == "redis://platform-redis:6379/1"


def test_prefixed_redis_url_wins_over_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://platform-redis:6379/1")
    monkeypatch.setenv("POSTBACK_RELAY_REDIS_URL", "redis://own-redis:6379/2")
    assert Settings().redis_url == "redis://own-redis:6379/2"


TIMEOUT_NAMES = ("http_connect_timeout", "task_soft_time_limit", "task_time_limit")


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(
            {
                "HTTP_CONNECT_TIMEOUT": "10",
                "HTTP_READ_TIMEOUT": "20",
                "TASK_SOFT_TIME_LIMIT": "30",
            },
            id="http-equals-soft",
        ),
        pytest.param(
            {"HTTP_READ_TIMEOUT": "40", "TASK_SOFT_TIME_LIMIT": "30"},
            id="http-above-soft",
        ),
        pytest.param(
            {"TASK_SOFT_TIME_LIMIT": "60", "TASK_TIME_LIMIT": "60"},
            id="soft-equals-hard",
        ),
        pytest.param(
            {"TASK_SOFT_TIME_LIMIT": "90", "TASK_TIME_LIMIT": "60"},
            id="soft-above-hard",
        ),
        pytest.param(
            {"TASK_TIME_LIMIT": "3600", "VISIBILITY_TIMEOUT": "3600"},
            id="hard-equals-visibility",
        ),
        pytest.param(
            {"TASK_TIME_LIMIT": "7200", "VISIBILITY_TIMEOUT": "3600"},
            id="hard-above-visibility",
        ),
    ],
)
def test_timeouts_must_nest(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(f"POSTBACK_RELAY_{key}", value)
    with pytest.raises(ValidationError) as excinfo:
        Settings()
    message = str(excinfo.value)
    assert "timeouts must nest" in message
    for name in (*TIMEOUT_NAMES, "http_read_timeout", "visibility_timeout"):
        assert name in message


def test_timeouts_that_nest_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_HTTP_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("POSTBACK_RELAY_HTTP_READ_TIMEOUT", "2")
    monkeypatch.setenv("POSTBACK_RELAY_TASK_SOFT_TIME_LIMIT", "3.5")
    monkeypatch.setenv("POSTBACK_RELAY_TASK_TIME_LIMIT", "4")
    monkeypatch.setenv("POSTBACK_RELAY_VISIBILITY_TIMEOUT", "60")
    settings = Settings()
    assert settings.task_soft_time_limit == 3.5
    assert settings.visibility_timeout == 60


@pytest.mark.parametrize(
    ("env", "visibility", "lease"),
    [
        pytest.param({}, 300, 600, id="defaults: 4 x 60 s + 60 s"),
        pytest.param({"TASK_TIME_LIMIT": "120"}, 540, 1080, id="a longer hard limit"),
        pytest.param({"WORKER_PREFETCH_MULTIPLIER": "1"}, 120, 240, id="no prefetch"),
        pytest.param({"TASK_TIME_LIMIT": "80.3"}, 382, 764, id="rounded up"),
        pytest.param({"VISIBILITY_TIMEOUT": "900"}, 900, 1800, id="set explicitly"),
        pytest.param({"LEDGER_LEASE": "400"}, 300, 400, id="lease set explicitly"),
    ],
)
def test_recovery_windows_derive_from_the_hard_limit_so_recovery_takes_minutes(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], visibility: int, lease: int
) -> None:
    """A dead worker's messages come back after the visibility timeout, a message kombu lost
    between BRPOP and its unacked record after the ledger lease: both were hours (3600 s,
    7200 s) although nothing waits in a countdown that would need them."""
    for key, value in env.items():
        monkeypatch.setenv(f"POSTBACK_RELAY_{key}", value)
    settings = Settings()
    assert settings.visibility_timeout_seconds == visibility
    assert settings.ledger_lease_seconds == lease
    # The last prefetched message is acked in time even if every task before it ran to the
    # hard limit.
    assert visibility > settings.worker_prefetch_multiplier * settings.task_time_limit


def test_timeouts_via_keyword_arguments() -> None:
    with pytest.raises(ValidationError, match="timeouts must nest"):
        Settings(task_soft_time_limit=10, task_time_limit=5)


def test_flower_user_without_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_FLOWER_USER", "admin")
    with pytest.raises(ValidationError) as excinfo:
        Settings()
    message = str(excinfo.value)
    assert "flower_user" in message
    assert "flower_password" in message
    assert "set together" in message


def test_flower_password_without_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_FLOWER_PASSWORD", "pw-123456")
    with pytest.raises(ValidationError, match="flower_user and flower_password"):
        Settings()


def test_flower_credentials_together_and_password_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_FLOWER_USER", "admin")
    monkeypatch.setenv("POSTBACK_RELAY_FLOWER_PASSWORD", "flower-pw-98765")
    settings = Settings()
    assert settings.flower_user == "admin"
    assert settings.flower_password is not None
    assert settings.flower_password.get_secret_value() == "flower-pw-98765"
    assert "flower-pw-98765" not in repr(settings)
    assert "flower-pw-98765" not in str(settings)


# --- SecretRedactor ----------------------------------------------------------------------------

KNOWN_SECRET = "s3cr3t-value"


def redact(event_dict: dict[str, Any], secrets: tuple[str, ...] = (KNOWN_SECRET,)) -> Any:
    return SecretRedactor(secrets)(None, "info", dict(event_dict))


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "access_token",
        "password",
        "Authorization",
        "authorization",
        "api_key",
        "apiKey",
        "api-key",
        "client_secret",
        "signature",
        "cookie",
    ],
)
def test_sensitive_keys_are_masked(key: str) -> None:
    out = redact({"event": "sending", key: "plain-value-123"})
    assert out[key] == REDACTED
    assert out["event"] == "sending"


def test_non_string_values_under_sensitive_keys_are_masked() -> None:
    out = redact({"token": 123456789, "password": ["a", "b"], "api_key": {"x": 1}})
    assert out == {"token": REDACTED, "password": REDACTED, "api_key": REDACTED}


def test_nested_dicts_and_lists_are_masked() -> None:
    out = redact(
        {
            "request": {
                "url": "https://example.com/pb",
                "headers": {"Authorization": "Bearer abc", "Accept": "application/json"},
                "params": [{"api_key": "k-1"}, {"page": 2}],
            }
        }
    )
    request = out["request"]
    assert request["url"] == "https://example.com/pb"
    assert request["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert request["params"] == [{"api_key": REDACTED}, {"page": 2}]


def test_known_secret_masked_inside_any_string() -> None:
    out = redact(
        {
            "event": f"delivering to https://example.com/pb?k={KNOWN_SECRET}&x=1",
            "url": f"https://example.com/{KNOWN_SECRET}/pb",
            "nested": {"note": f"prefix{KNOWN_SECRET}suffix", "items": [KNOWN_SECRET, "ok"]},
            "pair": ("a", f"x{KNOWN_SECRET}"),
        }
    )
    assert out["event"] == "delivering to https://example.com/pb?k=***&x=1"
    assert out["url"] == "https://example.com/***/pb"
    assert out["nested"] == {"note": "prefix***suffix", "items": [REDACTED, "ok"]}
    assert out["pair"] == ["a", f"x{REDACTED}"]
    assert KNOWN_SECRET not in json.dumps(out)


def test_every_occurrence_and_every_secret_is_masked() -> None:
    out = redact(
        {"event": f"{KNOWN_SECRET} and {KNOWN_SECRET} and other-secret-xyz"},
        secrets=(KNOWN_SECRET, "other-secret-xyz"),
    )
    assert out["event"] == "*** and *** and ***"


def test_other_values_untouched() -> None:
    original = {
        "event": "delivered",
        "destination": "alpha",
        "status": 200,
        "elapsed": 0.25,
        "ok": True,
        "missing": None,
        "meta": {"attempt": 2, "queue": "templated"},
    }
    assert redact(original) == original


def test_short_secrets_are_not_used_for_masking() -> None:
    out = SecretRedactor(["abc"])(None, "info", {"event": "abcdef"})
    assert out["event"] == "abcdef"


def test_secrets_added_later_are_masked() -> None:
    proc = SecretRedactor()
    assert proc(None, "info", {"event": "x late-secret-1 y"})["event"] == "x late-secret-1 y"
    proc.add(["late-secret-1"])
    assert proc(None, "info", {"event": "x late-secret-1 y"})["event"] == "x *** y"


# --- configure_logging end to end --------------------------------------------------------------


@contextmanager
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    known = set(redactor._secrets)
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
        redactor._secrets.intersection_update(known)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_configure_logging_json_redacts_secret(capsys: pytest.CaptureFixture[str]) -> None:
    with restored_logging():
        configure_logging(Settings(log_format="json"), secrets=[KNOWN_SECRET])
        log = structlog.get_logger("relay.test")
        log.info(
            f"posting to https://partner.example.com/pb?key={KNOWN_SECRET}",
            destination="alpha",
            url=f"https://partner.example.com/pb?key={KNOWN_SECRET}",
            token="bearer-token-1",
        )
        logging.getLogger("celery.test").warning("stdlib line with %s", KNOWN_SECRET)
        err = capsys.readouterr().err

    assert KNOWN_SECRET not in err
    assert "bearer-token-1" not in err
    assert REDACTED in err
    lines = json_lines(err)
    assert len(lines) == 2
    first, second = lines
    assert first["event"] == "posting to https://partner.example.com/pb?key=***"
    assert first["url"] == "https://partner.example.com/pb?key=***"
    assert first["token"] == REDACTED
    assert first["destination"] == "alpha"
    assert first["level"] == "info"
    assert first["logger"] == "relay.test"
    assert "timestamp" in first
    assert second["event"] == "stdlib line with ***"
    assert second["logger"] == "celery.test"
    assert second["level"] == "warning"


def test_configure_logging_respects_level(capsys: pytest.CaptureFixture[str]) -> None:
    with restored_logging():
        configure_logging(Settings(log_format="json", log_level="WARNING"))
        log = structlog.get_logger("relay.level")
        log.info("hidden-info-line")
        log.warning("shown-warning-line")
        err = capsys.readouterr().err
    assert "hidden-info-line" not in err
    assert [line["event"] for line in json_lines(err)] == ["shown-warning-line"]


def test_tracebacks_and_positional_args_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """Exception messages (requests puts the URL in them) are masked like any other text."""
    with restored_logging():
        configure_logging(Settings(log_format="json"), secrets=[KNOWN_SECRET])
        try:
            raise RuntimeError(f"failed GET https://p.example/?key={KNOWN_SECRET}")
        except RuntimeError:
            structlog.get_logger("relay.exc").exception("delivery crashed")
            logging.getLogger("celery.exc").exception("stdlib crash")
        structlog.get_logger("relay.pos").info("value %s", KNOWN_SECRET)
        err = capsys.readouterr().err
    assert KNOWN_SECRET not in err
    first, second, third = json_lines(err)
    assert first["exception"].endswith("key=***")
    assert second["exception"].endswith("key=***")
    assert third["event"] == "value ***"


def test_mask_secrets_masks_a_secret_as_written_and_as_url_encoded() -> None:
    from workers.logging import mask_secrets

    echoed = "bad token s3cr/t+k in https://p.example/?token=s3cr%2Ft%2Bk"
    assert mask_secrets(echoed, ["s3cr/t+k", ""]) == "bad token *** in https://p.example/?token=***"
