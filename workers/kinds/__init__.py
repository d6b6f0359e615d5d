"""The workers' side of each destination kind, found by convention from the one list of kinds
(config/kinds): the package workers/kinds/<kind>/ names its per-delivery adapter as ``ADAPTER``,
and its commands, if it has any, live in workers/kinds/<kind>/cli.py."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import cast

from config.destination_base import DestinationBase
from config.kinds import KINDS
from workers.kinds.base import DestinationAdapter

__all__ = ["ADAPTERS", "DestinationAdapter", "adapter_class", "adapter_for", "kind_commands"]


def adapter_class(kind: str) -> type[DestinationAdapter]:
    """The kind's adapter: ``ADAPTER`` in workers/kinds/<kind>/__init__.py."""
    package = importlib.import_module(f"{__name__}.{kind}")
    return cast("type[DestinationAdapter]", package.ADAPTER)


def kind_commands(kind: str) -> ModuleType | None:
    """workers/kinds/<kind>/cli.py when the kind has commands of its own: it has ``register(group)``
    and ``SECRETS_READ_BY`` (file section -> its commands that read that section's secrets)."""
    name = f"{__name__}.{kind}.cli"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


ADAPTERS: dict[str, type[DestinationAdapter]] = {kind: adapter_class(kind) for kind in KINDS}


def adapter_for(destination: DestinationBase) -> DestinationAdapter:
    return ADAPTERS[destination.kind](destination)
