"""The `xmp` kind: Mobvista XMP daily aggregates (the aggregate store and its flush, `xmp flush`,
the sandbox)."""

from workers.kinds.base import DestinationAdapter

# XMP is not sent one delivery at a time: the pipeline adds each delivery to the running
# aggregates and the flush sends them (aggregate.py), so there is no per-delivery adapter yet.
ADAPTER: type[DestinationAdapter] | None = None
