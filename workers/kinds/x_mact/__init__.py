"""The `x_mact` kind: X Mobile App Conversion Tracking (adapter, `x-check`, the sandbox)."""

from workers.kinds.x_mact.adapter import XMactAdapter

ADAPTER = XMactAdapter
