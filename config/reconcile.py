"""A [[reconcile]] source: an AppMetrica application whose failed postbacks are redelivered."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from config.destination_base import (
    NAME_PATTERN,
    SecretRef,
    SecretsNotResolved,
    SecretUse,
    Timeouts,
)

# The reconciler runs on the queue of the kind it redelivers to (workers/app.py), so the workers
# of that queue, and the `reconcile` command, are the ones that read an AppMetrica token.
RECONCILE_KIND = "redeliver"


class ReconcileSource(BaseModel):
    """An AppMetrica application whose postbacks export the reconciler reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    application_id: str = Field(pattern=r"^[0-9]{1,20}$")
    token: SecretRef
    redeliver_to: str = Field(pattern=NAME_PATTERN, description="a destination of kind redeliver")
    base_url: str = Field(
        default="https://api.appmetrica.yandex.com", pattern=r"^https?://[^/?#\s]+$"
    )
    date_dimension: Literal["default", "receive"] = "default"
    interval_seconds: float = Field(default=3600, ge=10)
    overlap_seconds: float = Field(default=3600, ge=0)
    settle_seconds: float = Field(default=600, ge=0)
    first_look_back_seconds: float = Field(default=86_400, gt=0)
    poll_seconds: float = Field(default=30, ge=1, le=600)
    retention_days: int = Field(default=30, ge=1, le=365)
    timeout: Timeouts = Field(default_factory=Timeouts)
    active: bool = True

    _token: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _retention_covers_the_window(self) -> ReconcileSource:
        window = self.overlap_seconds + self.settle_seconds + self.first_look_back_seconds
        if self.retention_days * 86_400 <= window:
            raise ValueError(
                "retention_days: must outlast the look-back window, or a postback could be "
                "redelivered twice"
            )
        return self

    def secret_uses(self) -> list[SecretUse]:
        return [SecretUse("reconcile", self.name, "token", "token", self.token, RECONCILE_KIND,
                          self.token.resolve)]  # fmt: skip

    def with_secrets(self, environ: Mapping[str, str]) -> Self:
        """A copy holding its token; ConfigError when it cannot be read."""
        (use,) = self.secret_uses()
        copy = self.model_copy()
        copy._token = use.read(environ)
        return copy

    def token_value(self) -> str:
        if self._token is None:
            raise SecretsNotResolved(
                f"reconcile {self.name!r}: its token was not read in this process; only the "
                "processes that run the reconciler read it (Destinations.with_secrets)"
            )
        return self._token.get_secret_value()

    def secrets_to_mask(self) -> list[str]:
        return [] if self._token is None else [self._token.get_secret_value()]
