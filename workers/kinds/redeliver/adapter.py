"""The `redeliver` kind: GET a postback URL exactly as an export recorded it.

The URL comes from outside, so it is checked first (SSRF): http/https only, an optional host
allow-list, and no host that resolves to a loopback, private, link-local, multicast or reserved
address unless the destination allows private addresses (the sandbox and tests do).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import ClassVar
from urllib.parse import urlsplit

from config.kinds.redeliver import RedeliverDestination
from schemas.envelope import DeliveryEnvelope
from schemas.outcomes import PermanentFailure
from workers.delivery.http import wire_url
from workers.kinds.base import DestinationAdapter, OutgoingRequest


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class RedeliverAdapter(DestinationAdapter):
    kind: ClassVar[str] = "redeliver"
    destination: RedeliverDestination

    def refusal(self, url: str) -> str | None:
        """Why this URL must not be fetched, or None."""
        split = urlsplit(url)
        if split.scheme not in {"http", "https"} or not split.hostname:
            return "refused: only http(s) URLs with a host are redelivered"
        host = split.hostname.lower()
        allow = self.destination.host_allowlist
        if allow and not any(host == h or host.endswith("." + h) for h in allow):
            return f"refused: host {host} is not in host_allowlist"
        if self.destination.allow_private:
            return None
        try:
            infos = socket.getaddrinfo(host, split.port or 443, proto=socket.IPPROTO_TCP)
        except socket.gaierror:
            return None  # resolution fails again at send time: a retryable connection error
        private = sorted({str(info[4][0]) for info in infos if not _public(str(info[4][0]))})
        if private:
            return f"refused: host {host} resolves to non-public address(es) {', '.join(private)}"
        return None

    def rate_limit_key(self, envelope: DeliveryEnvelope) -> str:
        """Limits apply per target host: many partners, each with its own capacity."""
        url = envelope.redelivery.postback_url if envelope.redelivery else ""
        return f"{self.destination.name}:{(urlsplit(url).hostname or '').lower()}"

    def build_request(self, envelope: DeliveryEnvelope) -> OutgoingRequest | PermanentFailure:
        if envelope.redelivery is None:
            return PermanentFailure("a redeliver delivery needs a postback URL")
        url = envelope.redelivery.postback_url
        why = self.refusal(url)
        if why is not None:
            return PermanentFailure(why)
        headers = {"X-Idempotency-Key": envelope.delivery_id}
        # Sent in the form requests sent it (an export's URL may hold characters to encode);
        # logged as the export recorded it. A redirect's target was never checked: it is not
        # followed (an answer of 3xx fails).
        return OutgoingRequest("GET", wire_url(url), url, headers, None, follow_redirects=False)
