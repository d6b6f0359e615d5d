"""The workers' side of each destination kind, found by convention from the one list of kinds
(config/kinds): the package workers/kinds/<kind>/ names its per-delivery adapter as ``ADAPTER``,
its commands, if it has any, live in workers/kinds/<kind>/cli.py, and its periodic Celery tasks, if
it has any, in workers/kinds/<kind>/tasks.py."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any, cast

from config.destination_base import DestinationBase
from config.kinds import KINDS
from workers.kinds.base import DestinationAdapter

__all__ = [
    "ADAPTERS",
    "DestinationAdapter",
    "adapter_class",
    "adapter_for",
    "beat_entry",
    "kind_commands",
    "kind_tasks",
]


def adapter_class(kind: str) -> type[DestinationAdapter]:
    """The kind's adapter: ``ADAPTER`` in workers/kinds/<kind>/__init__.py."""
    package = importlib.import_module(f"{__name__}.{kind}")
    return cast("type[DestinationAdapter]", package.ADAPTER)


def beat_entry(task: str, name: str, every: float, queue: str) -> dict[str, Any]:
    """Beat runs ``task(name)`` every ``every`` seconds on ``queue``; a run that could not start
    before the next one is due is dropped (it expires), so a backlog never piles up runs."""
    return {
        "task": task,
        "schedule": every,
        "args": (name,),
        "options": {"queue": queue, "expires": every},
    }


def _kind_module(kind: str, module: str) -> ModuleType | None:
    name = f"{__name__}.{kind}.{module}"
    return importlib.import_module(name) if importlib.util.find_spec(name) else None


def kind_commands(kind: str) -> ModuleType | None:
    """workers/kinds/<kind>/cli.py when the kind has commands of its own: it has ``register(group)``
    and ``SECRETS_READ_BY`` (file section -> its commands that read that section's secrets)."""
    return _kind_module(kind, "cli")


def kind_tasks(kind: str) -> ModuleType | None:
    """workers/kinds/<kind>/tasks.py when the kind has periodic work of its own: its
    ``register(app)`` adds the tasks to the app and returns their beat schedule entries."""
    return _kind_module(kind, "tasks")


ADAPTERS: dict[str, type[DestinationAdapter]] = {kind: adapter_class(kind) for kind in KINDS}


def adapter_for(destination: DestinationBase) -> DestinationAdapter:
    return ADAPTERS[destination.kind](destination)
