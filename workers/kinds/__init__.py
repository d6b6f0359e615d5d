"""One adapter per destination kind."""

from __future__ import annotations

from config.destinations import DestinationBase
from workers.kinds.base import DestinationAdapter
from workers.kinds.redeliver.adapter import RedeliverAdapter
from workers.kinds.templated.adapter import TemplatedAdapter
from workers.kinds.x_mact.adapter import XMactAdapter
from workers.kinds.xmp.adapter import XmpAdapter

__all__ = [
    "ADAPTERS",
    "DestinationAdapter",
    "RedeliverAdapter",
    "TemplatedAdapter",
    "XMactAdapter",
    "XmpAdapter",
    "adapter_for",
]

ADAPTERS: dict[str, type[DestinationAdapter]] = {
    adapter.kind: adapter
    for adapter in (TemplatedAdapter, XMactAdapter, XmpAdapter, RedeliverAdapter)
}


def adapter_for(destination: DestinationBase) -> DestinationAdapter:
    return ADAPTERS[destination.kind](destination)
