"""The `templated` kind: a partner's postback URL with AppsFlyer/Adjust-style macros."""

from __future__ import annotations

import json
from typing import ClassVar
from urllib.parse import urlencode

from config.kinds.templated import TemplatedDestination
from schemas.envelope import DeliveryEnvelope
from schemas.macros import DeliveryContext
from workers.delivery.http import wire_url
from workers.kinds.base import DestinationAdapter, OutgoingRequest


class TemplatedAdapter(DestinationAdapter):
    kind: ClassVar[str] = "templated"
    destination: TemplatedDestination

    def build_request(self, envelope: DeliveryEnvelope) -> OutgoingRequest:
        dest = self.destination
        event, secrets = envelope.require_event(), dest.secret_values()
        context = DeliveryContext(envelope.delivery_id, envelope.attempt)
        # In the form the session sends, so the URL the attempt log keeps is the URL received.
        template = dest.url_template
        url = display_url = wire_url(template.render(event, context, secrets, url_encode=True))
        if template.credentials:
            display_url = wire_url(
                template.render(event, context, secrets, url_encode=True, mask_secrets=True)
            )
        headers = {
            name: template.render(event, context, secrets, url_encode=False)
            for name, template in dest.header_templates.items()
        }
        headers["X-Idempotency-Key"] = envelope.delivery_id
        body: bytes | None = None
        if dest.method == "POST" and dest.body is not None:
            fields = {
                key: template.render(event, context, secrets, url_encode=False)
                for key, template in dest.body_templates.items()
            }
            if dest.body_format == "json":
                body = json.dumps(fields, separators=(",", ":")).encode()
                headers["Content-Type"] = "application/json"
            else:
                body = urlencode(fields).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
        return OutgoingRequest(dest.method, url, display_url, headers, body)
