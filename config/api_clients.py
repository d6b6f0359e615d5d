"""The API's clients file (POSTBACK_RELAY_API_CLIENTS_FILE): each client's bearer token by
reference to an environment variable or a file, as destination credentials are, the apps it may
send events for and its own rate limit. Read, and its tokens resolved, once at the API's start-up;
a wrong file or an unreadable token stops the process there (exit 2).

    [[client]]
    name = "go-backend"                           # in logs and metrics, never the token
    token = { env = "INGEST_TOKEN_GO" }           # or { file = "/run/secrets/ingest-go" }
    app_ids = ["id123456789", "com.example.game"]  # optional (absent: every app)
    rate_limit = "100/second"                     # optional: requests, over every API process
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import limits
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from config.destination_base import (
    NAME_PATTERN,
    ConfigError,
    SecretRef,
    checked_rate_limit,
    normalized_app_ids,
)
from schemas.errors import describe_validation_error

# A token shorter than this is guessable, and the log redactor would not mask it.
MIN_TOKEN_LENGTH = 16


class ClientEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    token: SecretRef
    app_ids: list[str] | None = Field(default=None, min_length=1)
    rate_limit: str | None = None

    @field_validator("app_ids")
    @classmethod
    def _normalized(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else normalized_app_ids(value)

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        return checked_rate_limit(value, f"not a rate limit like 100/second (got {value!r})")


class ClientsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client: list[ClientEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class ApiClient:
    """One client, its token resolved: only ever compared (in constant time), never shown."""

    name: str
    token: SecretStr
    app_ids: frozenset[str] | None
    rate_limit: limits.RateLimitItem | None

    def allows(self, app_id: str) -> bool:
        return self.app_ids is None or app_id in self.app_ids


def load_api_clients(
    path: Path | None, environ: Mapping[str, str] | None = None
) -> list[ApiClient]:
    """The clients of ``path`` with their tokens read; [] without a file. ConfigError names the
    file, the client and the variable or file that cannot be read."""
    if path is None:
        return []
    environ = os.environ if environ is None else environ
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"API clients file {path}: cannot be read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API clients file {path}: not valid TOML ({exc})") from None
    try:
        entries = ClientsFile.model_validate(data).client
    except ValidationError as exc:
        raise ConfigError(f"API clients file {path}: {describe_validation_error(exc)}") from None
    clients, names, values = [], set(), set()
    for entry in entries:
        where = f"API clients file {path}: client {entry.name!r}"
        if entry.name in names:
            raise ConfigError(f"{where}: a second client of this name")
        try:
            secret = entry.token.resolve(environ)
        except ValueError as exc:
            raise ConfigError(f"{where}: token: {exc}") from None
        value = secret.get_secret_value()
        if len(value) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"{where}: token: at least {MIN_TOKEN_LENGTH} characters "
                f"({entry.token.describe()} holds {len(value)})"
            )
        if value in values:
            raise ConfigError(f"{where}: token: the same value as another client's")
        names.add(entry.name)
        values.add(value)
        clients.append(
            ApiClient(
                entry.name,
                secret,
                frozenset(entry.app_ids) if entry.app_ids is not None else None,
                limits.parse(entry.rate_limit) if entry.rate_limit else None,
            )
        )
    return clients
