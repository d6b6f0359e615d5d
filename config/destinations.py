"""The destinations file: every destination, its credentials by reference, limits, retries, routes.

Loaded and validated once when a process starts. Anything wrong (an unknown kind or macro, a bad
URL) raises ConfigError naming the destination and the field, so the process stops before it
accepts or delivers anything.

Loading reads no secret: producers, beat, Flower and the read-only commands route and report
with the file alone and never hold a partner's credentials (ARCHITECTURE rule 9). A process that
sends asks for the secrets of what it sends to with ``Destinations.with_secrets``; a secret that
cannot be read stops it there, and using a secret that was never read raises SecretsNotResolved.

Here: the file as a whole (routing, secrets by process) and its loading. Each kind's model is in
config/kinds/<kind>.py, listed once in config/kinds; what they share in config/destination_base.py.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from config.destination_base import ConfigError, DestinationBase, Route, SecretUse
from config.kinds import KINDS
from config.reconcile import RECONCILE_KIND, ReconcileSource
from schemas.errors import describe_validation_error
from schemas.event import ConversionEvent


class Destinations:
    """The validated destinations file, with routing."""

    def __init__(
        self,
        destinations: Iterable[DestinationBase],
        source: str = "",
        reconcile: Iterable[ReconcileSource] = (),
    ) -> None:
        self.by_name: dict[str, DestinationBase] = {}
        for dest in destinations:
            if dest.name in self.by_name:
                raise ConfigError(f"{source}: destination {dest.name!r}: name: used twice")
            self.by_name[dest.name] = dest
        self.source = source
        self.reconcile: dict[str, ReconcileSource] = {}
        for rec in reconcile:
            target = self.by_name.get(rec.redeliver_to)
            if target is None or target.kind != RECONCILE_KIND:
                raise ConfigError(
                    f"{source}: reconcile {rec.name!r}: redeliver_to: {rec.redeliver_to!r} "
                    "must name a destination of kind redeliver"
                )
            if rec.name in self.reconcile:
                raise ConfigError(f"{source}: reconcile {rec.name!r}: name: used twice")
            self.reconcile[rec.name] = rec

    def __iter__(self) -> Iterator[DestinationBase]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> DestinationBase:
        return self.by_name[name]

    @property
    def kinds(self) -> set[str]:
        return {d.kind for d in self}

    def _secret_owners(self) -> list[DestinationBase | ReconcileSource]:
        return [*self, *self.reconcile.values()]

    def secret_uses(self) -> list[SecretUse]:
        """Every credential reference in the file, with the kind whose workers send with it."""
        return [use for owner in self._secret_owners() for use in owner.secret_uses()]

    def with_secrets(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        kinds: Iterable[str] = (),
        destinations: Iterable[str] = (),
        reconcile: Iterable[str] = (),
    ) -> Destinations:
        """A copy in which what a sending process sends to holds its secrets: destinations of
        ``kinds`` (and every reconcile source when the redeliver kind is among them, since the
        reconciler runs there), and those named. The rest stay without: using one of their
        secrets raises SecretsNotResolved. ConfigError names the destination and the variable
        or file of the first secret that cannot be read."""
        environ = os.environ if environ is None else environ
        kinds, names, sources = set(kinds), set(destinations), set(reconcile)
        try:
            dests = [
                d.with_secrets(environ) if d.kind in kinds or d.name in names else d for d in self
            ]
            recs = [
                r.with_secrets(environ) if RECONCILE_KIND in kinds or r.name in sources else r
                for r in self.reconcile.values()
            ]
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        return Destinations(dests, self.source, recs)

    def secrets_held(self) -> list[str]:
        """Every secret this process has read: for log redaction and masking."""
        return [value for owner in self._secret_owners() for value in owner.secrets_to_mask()]

    def routes_for(self, event: ConversionEvent) -> list[tuple[DestinationBase, Route]]:
        """Every destination that wants this event, each with the first route that matched."""
        matched = []
        for dest in self.by_name.values():
            route = dest.route_for(event)
            if route is not None:
                matched.append((dest, route))
        return matched


def check_timeouts_nest(destinations: Destinations, max_connect: float, max_read: float) -> None:
    """Each destination's HTTP timeouts must fit under the process's (which nest below the task
    limits), so no delivery can outlive its task's time limit or the visibility timeout."""
    for dest in destinations:
        for field, value, limit in (
            ("timeout.connect", dest.timeout.connect, max_connect),
            ("timeout.read", dest.timeout.read, max_read),
        ):
            if value > limit:
                setting = "POSTBACK_RELAY_HTTP_" + field.split(".")[1].upper() + "_TIMEOUT"
                raise ConfigError(
                    f"{destinations.source}: destination {dest.name!r}: {field}: {value:g}s is "
                    f"longer than {setting} ({limit:g}s); raise it together with the task limits"
                )


def parse_destinations(data: Mapping[str, Any], source: str = "destinations") -> Destinations:
    """Validate the file's content; no secret is read (see Destinations.with_secrets)."""
    unknown = set(data) - {"destination", "reconcile"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}; use [[destination]] "
            "and [[reconcile]]"
        )
    entries = data.get("destination", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: destination: must be an array of tables ([[destination]])")
    parsed = []
    for index, entry in enumerate(entries):
        label = f"#{index + 1}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label = repr(entry["name"])
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: destination {label}: must be a table")
        model = KINDS.get(entry.get("kind"))  # type: ignore[arg-type]
        if model is None:
            raise ConfigError(
                f"{source}: destination {label}: kind: must be one of {', '.join(KINDS)}"
                f" (got {entry.get('kind')!r})"
            )
        try:
            dest = model.model_validate(entry)
        except ValidationError as exc:
            detail = describe_validation_error(exc)
            raise ConfigError(f"{source}: destination {label}: {detail}") from None
        parsed.append(dest)
    return Destinations(parsed, source, _parse_reconcile(data.get("reconcile", []), source))


def _parse_reconcile(entries: Any, source: str) -> list[ReconcileSource]:
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: reconcile: must be an array of tables ([[reconcile]])")
    parsed = []
    for index, entry in enumerate(entries):
        label = (
            repr(entry["name"]) if isinstance(entry, dict) and "name" in entry else f"#{index + 1}"
        )
        try:
            rec = ReconcileSource.model_validate(entry)
        except ValidationError as exc:
            raise ConfigError(
                f"{source}: reconcile {label}: {describe_validation_error(exc)}"
            ) from None
        parsed.append(rec)
    return parsed


def load_destinations(path: Path) -> Destinations:
    """Read and validate the destinations file, reading no secret; ConfigError on any problem.
    A process that sends then calls ``with_secrets`` for what it sends to."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"destinations file {path}: cannot be read ({exc.strerror}); "
            "set POSTBACK_RELAY_DESTINATIONS_FILE or see config/destinations.example.toml"
        ) from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"destinations file {path}: not valid TOML ({exc})") from None
    return parse_destinations(data, str(path))
