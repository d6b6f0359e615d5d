"""The destination kinds, listed once: a kind's name and its config model.

Everything else that is per kind follows from this list: the queues and delivery tasks
(workers/app.py), the adapters (workers/kinds/<kind>/), the kind-specific commands
(workers/kinds/<kind>/cli.py). Adding a kind is adding its model here, in config/kinds/<kind>.py,
and its folder under workers/kinds/.
"""

from __future__ import annotations

from config.destination_base import DestinationBase
from config.kinds.redeliver import RedeliverDestination
from config.kinds.templated import TemplatedDestination
from config.kinds.x_mact import XMactDestination
from config.kinds.xmp import XmpDestination

KINDS: dict[str, type[DestinationBase]] = {
    "templated": TemplatedDestination,
    "x_mact": XMactDestination,
    "xmp": XmpDestination,
    "redeliver": RedeliverDestination,
}
