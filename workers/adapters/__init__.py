"""One adapter per destination kind."""

from __future__ import annotations

from config.destinations import DestinationBase
from workers.adapters.base import DestinationAdapter
from workers.adapters.redeliver import RedeliverAdapter
from workers.adapters.templated import TemplatedAdapter
from workers.adapters.x_mact import XMactAdapter

__all__ = [
    "ADAPTERS",
    "DestinationAdapter",
    "RedeliverAdapter",
    "TemplatedAdapter",
    "XMactAdapter",
    "adapter_for",
]

ADAPTERS: dict[str, type[DestinationAdapter]] = {
    adapter.kind: adapter for adapter in (TemplatedAdapter, XMactAdapter, RedeliverAdapter)
}


def adapter_for(destination: DestinationBase) -> DestinationAdapter:
    return ADAPTERS[destination.kind](destination)
