"""The `xmp` kind: Mobvista XMP daily aggregates. Each delivery is added to the running totals
(aggregate.py); the periodic flush (flush.py) sends the changed records through the shared sender
with the adapter below; `xmp flush` (cli.py); the sandbox XMP (sandbox.py)."""

from workers.kinds.xmp.adapter import XmpAdapter

ADAPTER = XmpAdapter
