"""One HTTP attempt for any destination kind: send an OutgoingRequest, let its adapter classify
the answer, and say how long it took. Per-event deliveries and XMP's batch flush both send here."""

from __future__ import annotations

import time

import urllib3

from schemas.outcomes import Outcome
from workers.delivery.client import (
    HttpClient,
    TooManyRedirects,
    body_encoding,
    failure_of,
    read_excerpt,
)
from workers.delivery.http import HttpAnswer
from workers.kinds.base import RESPONSE_READ_BYTES, DestinationAdapter, OutgoingRequest
from workers.logging import mask_secrets


class Sender:
    def __init__(self, client: HttpClient) -> None:
        self.client = client
        # One urllib3 Timeout per destination timeout: the pool clones it for each request.
        self._timeouts: dict[tuple[float, float], urllib3.Timeout] = {}

    def timeout(self, connect: float, read: float) -> urllib3.Timeout:
        """connect, read, and total = connect + read: a partner trickling bytes cannot hold a
        greenlet past the soft time limit (the threads pool enforces no Celery limits)."""
        timeout = self._timeouts.get((connect, read))
        if timeout is None:
            timeout = urllib3.Timeout(connect=connect, read=read, total=connect + read)
            self._timeouts[(connect, read)] = timeout
        return timeout

    def send(self, adapter: DestinationAdapter, request: OutgoingRequest) -> tuple[Outcome, float]:
        """The adapter's verdict on the answer (or on the failure to get one) and the seconds
        the exchange took. Never raises for a network failure: that is an outcome too."""
        limits = adapter.destination.timeout
        started = time.perf_counter()
        try:
            response = self.client.open(
                request.method,
                request.url,
                headers=request.headers,
                body=request.body,
                timeout=self.timeout(limits.connect, limits.read),
                follow_redirects=request.follow_redirects,
            )
            excerpt = read_excerpt(response, RESPONSE_READ_BYTES)
        except (urllib3.exceptions.HTTPError, OSError, TooManyRedirects) as exc:
            outcome = adapter.classify_error(failure_of(exc))
        else:
            encoding = body_encoding(response.headers.get("Content-Type"))
            try:
                text = excerpt.decode(encoding, errors="replace")
            except LookupError:  # a charset Python does not know: read as UTF-8, not a crash
                text = excerpt.decode("utf-8", errors="replace")
            text = mask_secrets(text, adapter.destination.secrets_to_mask())
            outcome = adapter.classify(HttpAnswer.of(response.status, response.headers), text)
        return outcome, time.perf_counter() - started
