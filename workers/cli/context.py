"""What every CLI command needs, built once per invocation from the environment: settings,
the destinations file (secrets only for what a command sends to), Redis and its stores, and the
parsing of durations and times the options share."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError
from redis import Redis
from rich.console import Console

from config.destination_base import ConfigError
from config.destinations import Destinations, load_destinations
from config.keys import RedisKeys
from config.redis import RedisSettings
from config.settings import Settings
from schemas.errors import describe_validation_error

if TYPE_CHECKING:
    from workers.delivery.ratelimit import PauseRegistry
    from workers.stores.attempts import AttemptLog
    from workers.stores.deadletter import DeadLetterStore

EXIT_CONFIG = 2
console = Console()
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def load_settings() -> Settings:
    try:
        return Settings()
    except ConfigError as exc:  # a Redis instance's settings (config/redis.py)
        raise click.ClickException(f"settings: {exc}") from None
    except ValidationError as exc:
        raise click.ClickException(
            "settings: "
            + describe_validation_error(exc)
            + " (environment variables POSTBACK_RELAY_*)"
        ) from None


@dataclass
class CliContext:
    settings: Settings

    @cached_property
    def destinations(self) -> Destinations:
        """Routing, kinds and templates, without a single secret: all most commands need."""
        try:
            return load_destinations(self.settings.destinations_file)
        except ConfigError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)

    def sending(
        self,
        *,
        kinds: Iterable[str] = (),
        destinations: Iterable[str] = (),
        reconcile: Iterable[str] = (),
    ) -> Destinations:
        """The destinations with the secrets of what this command sends to (see
        Destinations.with_secrets), registered for log redaction as they are read. A secret
        that cannot be read stops the command here, naming the destination and the variable."""
        from workers.logging import redactor

        try:
            resolved = self.destinations.with_secrets(
                kinds=kinds, destinations=destinations, reconcile=reconcile
            )
        except ConfigError as exc:
            click.echo(f"Error: {exc} (check-config lists who needs which secret)", err=True)
            sys.exit(EXIT_CONFIG)
        redactor.add(resolved.secrets_held())
        return resolved

    @cached_property
    def redis(self) -> Redis:
        """The state instance's client (dead letters, attempts, pauses, the ledger)."""
        from workers.redis_clients import client

        return client(self.settings.state_redis)

    @cached_property
    def broker_redis(self) -> Redis:
        """The broker instance's client (queues, in-flight messages): ``redis`` unless the state
        has an instance of its own."""
        from workers.redis_clients import client

        return client(self.settings.broker_redis) if self.settings.separate_state else self.redis

    def instances(self) -> list[tuple[str, RedisSettings, Redis]]:
        """(which, its settings, its client) of each Redis instance this process talks to."""
        broker, state = self.settings.broker_redis, self.settings.state_redis
        if not self.settings.separate_state:
            return [("broker and state (one instance)", broker, self.redis)]
        return [("broker", broker, self.broker_redis), ("state", state, self.redis)]

    def refuse_unverified_tls(self) -> None:
        """Stop (exit 2) when a rediss:// instance's certificate does not verify: that is a
        wrong setting, which retrying forever (what a worker does while Redis is down, rule 7)
        would never fix. Any other connection error is left to those retries."""
        from redis import ConnectionError as RedisConnectionError

        from workers.redis_clients import tls_verification_failure

        for which, conf, client in self.instances():
            if conf.form != "rediss":
                continue
            try:
                client.ping()
            except RedisConnectionError as exc:
                failure = tls_verification_failure(exc)
                if failure is not None:
                    click.echo(f"Error: redis {which} at {conf.describe()}: {failure}", err=True)
                    sys.exit(EXIT_CONFIG)

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.settings.key_prefix)

    @property
    def dead_letters(self) -> DeadLetterStore:
        from workers.stores.deadletter import DeadLetterStore

        return DeadLetterStore(self.redis, self.keys)

    @property
    def attempt_log(self) -> AttemptLog:
        from workers.stores.attempts import AttemptLog

        return AttemptLog(self.redis, self.keys, self.settings.attempt_log_max_records)

    @property
    def pauses(self) -> PauseRegistry:
        from workers.delivery.ratelimit import PauseRegistry

        return PauseRegistry(self.redis, self.keys)

    def start_app(self, destinations: Destinations | None = None) -> Any:
        """Configure logging and build the app: with ``destinations`` from sending() in a
        process that sends, else with the file alone (beat, Flower, health read no secret)."""
        from workers.app import create_app
        from workers.logging import configure_logging

        if destinations is None:
            destinations = self.destinations
        configure_logging(self.settings, destinations.secrets_held())
        self.refuse_unverified_tls()
        try:
            return create_app(self.settings, destinations)
        except ConfigError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)


def context() -> CliContext:
    return CliContext(load_settings())


def _duration(value: str) -> timedelta | None:
    match = _RELATIVE.match(value.strip())
    if match is None:
        return None
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def parse_duration(value: str) -> float:
    """'300s', '5m', '1h' or plain seconds, as seconds."""
    duration = _duration(value)
    if duration is not None:
        return duration.total_seconds()
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise click.BadParameter(f"{value!r}: use a duration like 90s, 5m or 1h")
    return seconds


def parse_since(value: str | None) -> datetime | None:
    """'90m', '24h', '7d' (ago) or an ISO-8601 time; naive times are taken as UTC."""
    if value is None:
        return None
    duration = _duration(value)
    if duration is not None:
        return datetime.now(UTC) - duration
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use a duration like 90m, 24h, 7d or a time like 2026-11-22T10:00:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
