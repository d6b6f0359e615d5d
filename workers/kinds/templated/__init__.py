"""The `templated` kind: a partner's postback URL template with macros."""

from workers.kinds.templated.adapter import TemplatedAdapter

ADAPTER = TemplatedAdapter
