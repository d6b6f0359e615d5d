"""One HTTP attempt for any destination kind: send an OutgoingRequest, let its adapter classify
the answer, and say how long it took. Per-event deliveries and XMP's batch flush both send here."""

from __future__ import annotations

import time

import requests
from urllib3.util import Timeout

from schemas.outcomes import Outcome
from workers.kinds.base import RESPONSE_READ_BYTES, DestinationAdapter, OutgoingRequest
from workers.logging import mask_secrets


class Sender:
    def __init__(self, session: requests.Session) -> None:
        self.session = session

    def send(self, adapter: DestinationAdapter, request: OutgoingRequest) -> tuple[Outcome, float]:
        """The adapter's verdict on the answer (or on the failure to get one) and the seconds
        the exchange took. Never raises for a network failure: that is an outcome too."""
        timeout = adapter.destination.timeout
        started = time.perf_counter()
        try:
            with self.session.request(
                request.method,
                request.url,
                headers=request.headers,
                data=request.body,
                # total= bounds the whole exchange: a partner trickling bytes cannot hold a
                # thread past the soft time limit (the threads pool enforces no Celery limits).
                # requests hands a urllib3 Timeout through as is; its stubs only know floats.
                timeout=Timeout(  # type: ignore[arg-type]
                    connect=timeout.connect,
                    read=timeout.read,
                    total=timeout.connect + timeout.read,
                ),
                stream=True,
                allow_redirects=request.follow_redirects,
            ) as response:
                excerpt = response.raw.read(RESPONSE_READ_BYTES, decode_content=True)
                text = mask_secrets(
                    excerpt.decode(response.encoding or "utf-8", errors="replace"),
                    adapter.destination.secrets_to_mask(),
                )
                outcome = adapter.classify(response, text)
        except requests.RequestException as exc:
            outcome = adapter.classify_error(exc)
        return outcome, time.perf_counter() - started
