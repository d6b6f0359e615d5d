"""What every destination kind shares: credentials by reference, retries, timeouts, routes.

Each kind's model (config/kinds/) subclasses DestinationBase; the errors raised while loading
the file are defined here so every kind and the loader raise the same ones.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, Self

import limits
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from schemas.errors import PostbackRelayError
from schemas.event import ConversionEvent

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
_IOS_NUMERIC = re.compile(r"^\d{1,12}$")


def normalized_app_ids(apps: list[str]) -> list[str]:
    """App ids as events carry them once validated: an iOS 123456789 is id123456789."""
    return ["id" + a if _IOS_NUMERIC.match(a) else a for a in apps]


def checked_rate_limit(value: str | None, rule: str) -> str | None:
    """``value`` when the `limits` package parses it (None stays None); else ValueError with
    ``rule``, the message the setting's validator gives."""
    if value is not None:
        try:
            limits.parse(value)
        except ValueError:
            raise ValueError(rule) from None
    return value


class ConfigError(PostbackRelayError):
    """The destinations file or settings cannot be used; the message says where and why."""


class SecretsNotResolved(PostbackRelayError, RuntimeError):
    """A credential was used in a process that never read it: a bug, never an empty value."""


@dataclasses.dataclass(frozen=True)
class SecretUse:
    """One credential reference: whose it is, and the kind whose workers send with it."""

    section: Literal["destination", "reconcile"]
    owner_name: str
    name: str  # the credential's name: "api_key", or "token" for a reconcile source
    field: str  # where it is in the file: "credentials.api_key", "token"
    ref: SecretRef
    kind: str
    _read: Callable[[Mapping[str, str]], SecretStr] = dataclasses.field(repr=False, compare=False)

    @property
    def owner(self) -> str:
        return f"{self.section} {self.owner_name!r}"

    def read(self, environ: Mapping[str, str]) -> SecretStr:
        """The value; ConfigError naming the owner, the field and the variable or file."""
        try:
            return self._read(environ)
        except ValueError as exc:
            raise ConfigError(f"{self.owner}: {self.field}: {exc}") from None


class SecretRef(BaseModel):
    """A credential by reference: an environment variable or a file (Docker/K8s secrets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError('give exactly one of env = "VAR" or file = "/path"')
        return self

    def describe(self) -> str:
        return f"env {self.env}" if self.env is not None else f"file {self.file}"

    def resolve(self, environ: Mapping[str, str]) -> SecretStr:
        if self.env is not None:
            value = environ.get(self.env)
            if not value:
                raise ValueError(f"environment variable {self.env} is not set or is empty")
            return SecretStr(value)
        assert self.file is not None
        try:
            value = self.file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"secret file {self.file} cannot be read ({exc.strerror})") from None
        if not value:
            raise ValueError(f"secret file {self.file} is empty")
        return SecretStr(value)


class RetryPolicy(BaseModel):
    """When to try again. ``max_attempts`` counts redeliveries after the first send, as Kochava's
    ``max_delivery_attempts`` does (0 = do not retry, up to 10)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=5, ge=0, le=10)
    base_seconds: float = Field(default=30.0, gt=0)
    factor: float = Field(default=2.0, ge=1)
    cap_seconds: float = Field(default=3600.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, le=1, description="+- share of the delay")
    schedule: list[Annotated[float, Field(ge=0)]] | None = Field(default=None, max_length=10)
    max_age_seconds: float = Field(default=86_400.0, gt=0)

    def delay_for(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before redelivery ``retry_number`` (1-based). Pure, tested alone."""
        if self.schedule:
            base = self.schedule[min(retry_number, len(self.schedule)) - 1]
        else:
            base = min(self.cap_seconds, self.base_seconds * self.factor ** (retry_number - 1))
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base)


class Timeouts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    connect: float = Field(default=3.05, gt=0, le=60)
    read: float = Field(default=10.0, gt=0, le=120)


class Route(BaseModel):
    """Which events a destination receives (Kochava's postback trigger model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["install", "event"]
    events: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, description="event names; empty = every in-app event"
    )
    apps: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        default_factory=list, description="app ids; empty = every app"
    )
    delay_seconds: float = Field(default=0, ge=0, le=600)
    max_delivery_attempts: int | None = Field(default=None, ge=0, le=10)
    active: bool = True

    @field_validator("apps")
    @classmethod
    def _normalize_apps(cls, apps: list[str]) -> list[str]:
        return normalized_app_ids(apps)

    @model_validator(mode="after")
    def _install_has_no_event_filter(self) -> Route:
        if self.type == "install" and self.events:
            raise ValueError("events: an install route matches installs only; remove the filter")
        return self

    def matches(self, event: ConversionEvent) -> bool:
        if not self.active:
            return False
        if self.apps and event.app_id not in self.apps:
            return False
        if self.type == "install":
            return event.is_install
        return not event.is_install and (not self.events or event.event_name in self.events)


class DestinationBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str = Field(pattern=NAME_PATTERN)
    credentials: dict[str, SecretRef] = Field(default_factory=dict)
    rate_limit: str | None = Field(
        default=None, description='e.g. "50/second" or "60000 per 15 minutes" (limits syntax)'
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: Timeouts = Field(default_factory=Timeouts)
    routes: list[Route] = Field(min_length=1)
    active: bool = True

    # None until this process reads them (with_secrets); a producer's copy stays None.
    _secrets: dict[str, SecretStr] | None = PrivateAttr(default=None)

    @field_validator("rate_limit")
    @classmethod
    def _parse_rate_limit(cls, value: str | None) -> str | None:
        return checked_rate_limit(
            value, 'must read like "50/second", "1000 per minute" or "60000 per 15 minutes"'
        )

    @property
    def rate_limit_item(self) -> limits.RateLimitItem | None:
        return limits.parse(self.rate_limit) if self.rate_limit else None

    def secret(self, name: str) -> str:
        return self._read_secrets()[name].get_secret_value()

    def secret_values(self) -> dict[str, str]:
        return {k: v.get_secret_value() for k, v in self._read_secrets().items()}

    def secrets_to_mask(self) -> list[str]:
        """The secrets of this destination this process holds (none if it never read them):
        what must be masked out of anything it logs or stores."""
        return [v.get_secret_value() for v in (self._secrets or {}).values()]

    def _read_secrets(self) -> dict[str, SecretStr]:
        if self._secrets is None and self.credentials:
            raise SecretsNotResolved(
                f"destination {self.name!r}: its credentials were not read in this process; "
                "only the processes that send to it read them (Destinations.with_secrets)"
            )
        return self._secrets or {}  # a destination without credentials has nothing to read

    def secret_uses(self) -> list[SecretUse]:
        uses = []
        for name, ref in self.credentials.items():
            read = partial(self._read_secret, name)
            uses.append(SecretUse("destination", self.name, name, f"credentials.{name}", ref,
                                  self.kind, read))  # fmt: skip
        return uses

    def _read_secret(self, name: str, environ: Mapping[str, str]) -> SecretStr:
        value = self.credentials[name].resolve(environ)
        self.check_secret(name, value.get_secret_value())
        return value

    def with_secrets(self, environ: Mapping[str, str]) -> Self:
        """A copy holding its credentials; ConfigError on the first that cannot be read."""
        resolved = {use.name: use.read(environ) for use in self.secret_uses()}
        copy = self.model_copy()
        copy._secrets = resolved
        return copy

    def check_secret(self, name: str, value: str) -> None:
        """Kinds with a format for a credential check it here, when it is read; never echo it."""

    def route_for(self, event: ConversionEvent) -> Route | None:
        if not self.active:
            return None
        return next((r for r in self.routes if r.matches(event)), None)
