"""XMP's adapter: the flush request for a batch of records, and XMP's answer as an Outcome.

XMP answers HTTP 200 with its own ``{code, msg, batch_id}``: only code 200 is accepted; 401
(bad token) pauses the destination like any kind's credentials failure; 400 refuses a record
of the batch (the flush bisects to find it); the rest is worth another flush.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any, ClassVar

from config.kinds.xmp import XmpDestination
from schemas.envelope import DeliveryEnvelope
from schemas.outcomes import Delivered, Outcome, PermanentFailure, RetryLater
from workers.delivery.http import HttpAnswer, retry_after_seconds
from workers.kinds.base import RETRYABLE_STATUSES, DestinationAdapter, OutgoingRequest
from workers.kinds.xmp.aggregate import XmpRecord
from workers.logging import mask_secrets

UNAUTHORIZED_PAUSE_SECONDS = 24 * 3600  # until an operator fixes the token and resumes


class XmpAdapter(DestinationAdapter):
    kind: ClassVar[str] = "xmp"
    sends_each_delivery: ClassVar[bool] = False
    destination: XmpDestination

    def build_request(self, envelope: DeliveryEnvelope) -> PermanentFailure:
        """Never reached while the pipeline has XMP's aggregator: XMP takes totals, not events."""
        return PermanentFailure("xmp takes daily totals: a delivery is aggregated, never sent")

    def build_flush(self, records: Sequence[XmpRecord]) -> OutgoingRequest:
        dest = self.destination
        body = {"xmp_token": dest.secret("xmp_token"), "activity_kind": "in-app-event-agg",
                "data": [r.payload(dest) for r in records]}  # fmt: skip
        return OutgoingRequest(
            "POST",
            dest.url,
            mask_secrets(dest.url, dest.secrets_to_mask()),
            headers={"Content-Type": "application/json"},
            body=dumps_exact(body),
        )

    def classify(self, answer: HttpAnswer, body_excerpt: str) -> Outcome:
        status = answer.status
        said = _parse(body_excerpt)
        code = said.get("code") if isinstance(said.get("code"), int) else status
        msg = str(said.get("msg", ""))[:500]
        if status == 200 and code == 200:
            return Delivered(status, body_excerpt)
        if code == 401 or status in {401, 403}:
            return PermanentFailure(
                f"XMP answered {code} {msg}", status, body_excerpt,
                alarm=True, pause_seconds=UNAUTHORIZED_PAUSE_SECONDS,
            )  # fmt: skip
        if code == 400 or (400 <= status < 500 and status not in RETRYABLE_STATUSES):
            return PermanentFailure(f"XMP rejected the record: {code} {msg}", status, body_excerpt)
        return RetryLater(
            f"XMP answered HTTP {status} code {code} {msg}".strip(),
            status,
            body_excerpt,
            retry_after_seconds(answer.header("Retry-After")),
        )

    @staticmethod
    def batch_id(outcome: Outcome) -> str:
        """The id XMP gave the batch ("" when it gave none), kept with the attempt."""
        return str(_parse(getattr(outcome, "body_excerpt", "")).get("batch_id", ""))


def _parse(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def dumps_exact(body: Any) -> bytes:
    """JSON with Decimals as exact numbers (never via float: numeric(20,6) needs 20 digits)."""
    marker = f"__decimal_{uuid.uuid4().hex}__"

    def default(value: Any) -> str:
        if isinstance(value, Decimal):
            return f"{marker}{value}"
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    text = json.dumps(body, default=default, separators=(",", ":"))
    return re.sub(rf'"{marker}(-?[0-9.]+)"', r"\1", text).encode()


def iter_payloads(dest: XmpDestination, records: Sequence[XmpRecord]) -> Iterator[list[Any]]:
    """What a flush would send, batch by batch (the token left out): for --dry-run."""
    for start in range(0, len(records), dest.batch_size):
        yield [r.payload(dest) for r in records[start : start + dest.batch_size]]
