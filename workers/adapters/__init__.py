"""One adapter per destination kind."""

from __future__ import annotations

from config.destinations import DestinationBase
from workers.adapters.base import DestinationAdapter
from workers.adapters.templated import TemplatedAdapter

__all__ = ["ADAPTERS", "DestinationAdapter", "TemplatedAdapter", "adapter_for"]

ADAPTERS: dict[str, type[DestinationAdapter]] = {TemplatedAdapter.kind: TemplatedAdapter}


def adapter_for(destination: DestinationBase) -> DestinationAdapter:
    return ADAPTERS[destination.kind](destination)
