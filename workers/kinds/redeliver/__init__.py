"""The `redeliver` kind: redelivery of postbacks another system failed to send (adapter, the
AppMetrica reconciler and its `reconcile` command, the sandbox)."""

from workers.kinds.redeliver.adapter import RedeliverAdapter

ADAPTER = RedeliverAdapter
