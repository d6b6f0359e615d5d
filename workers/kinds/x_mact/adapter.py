"""The `x_mact` kind: X Mobile App Conversion Tracking, `POST /12/conversion_event`.

Requests are signed with OAuth 1.0a (HMAC-SHA1) by oauthlib; parameters travel in the query
string, so they are part of the signature base string. X's error JSON (`errors[].code`) decides
the classification together with the status; its rate-limit headers tighten our shared limiter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from decimal import Decimal
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode

from oauthlib.oauth1 import SIGNATURE_HMAC_SHA1, SIGNATURE_TYPE_AUTH_HEADER, Client

from config.kinds.x_mact import XMactDestination
from schemas.envelope import DeliveryEnvelope
from schemas.event import ConversionEvent
from schemas.macros import iso_millis
from schemas.outcomes import (
    Delivered,
    Outcome,
    PermanentFailure,
    RateBudget,
    RetryLater,
    Skipped,
)
from workers.delivery.http import HttpAnswer, retry_after_seconds
from workers.kinds.base import DestinationAdapter, OutgoingRequest

# A 401 means the credentials are wrong: every further request would fail the same way.
UNAUTHORIZED_PAUSE_SECONDS = 24 * 3600


def hashed_device_id(partner_key_b64: str, device_id: str) -> str:
    """base64(HMAC-SHA256(key=base64decode(partner key), msg=device id)): 44 characters."""
    key = base64.b64decode(partner_key_b64)
    digest = hmac.new(key, device_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def price_micro(amount: Decimal) -> int:
    """Exact: the schema allows at most 6 decimals, so amount x 10^6 is an integer."""
    return int((amount * 1_000_000).to_integral_exact())


class XMactAdapter(DestinationAdapter):
    kind: ClassVar[str] = "x_mact"
    destination: XMactDestination
    uses_server_budget: ClassVar[bool] = True

    def device_id(self, event: ConversionEvent) -> str | None:
        if event.platform == "ios":
            if not event.idfa:
                return None
            case = self.destination.idfa_case
            return event.idfa.upper() if case == "upper" else (
                event.idfa.lower() if case == "lower" else event.idfa
            )  # fmt: skip
        if event.gaid:
            return event.gaid
        if event.android_id:
            return hashlib.sha1(event.android_id.encode()).hexdigest()  # noqa: S324 - X's format
        return None

    def params(self, event: ConversionEvent) -> dict[str, str] | Skipped:
        dest = self.destination
        conversion_type = dest.conversion_map.get(event.event_name)
        if conversion_type is None:
            return Skipped(f"no X conversion_type for event {event.event_name!r}")
        device = self.device_id(event)
        if device is None:
            return Skipped("no device id X can use (IDFA, GAID or Android ID)")
        params = {
            "app_id": event.store_app_id,
            "conversion_time": iso_millis(event.event_time) or "",
            "conversion_type": conversion_type,
            "hashed_device_id": hashed_device_id(dest.secret("partner_key"), device),
            "os_type": "IOS" if event.platform == "ios" else "ANDROID",
            "click_window": str(dest.click_window),
            "view_through_window": str(dest.view_through_window),
        }
        if event.ip:
            params["device_ip_address"] = str(event.ip)
        if event.revenue is not None and event.revenue >= 0 and event.currency:
            params["price_micro"] = str(price_micro(event.revenue))
            params["price_currency"] = event.currency
        for param, key in (("number_items", dest.number_items_key), ("level", dest.level_key)):
            value = event.event_values.get(key)
            if isinstance(value, int | str) and re.fullmatch(r"[0-9]{1,9}", str(value)):
                params[param] = str(int(value))
        return params

    def _signed(
        self, method: Literal["GET", "POST"], endpoint: str, params: dict[str, str]
    ) -> OutgoingRequest:
        dest = self.destination
        url = f"{dest.base_url}/{dest.api_version}/{endpoint}?{urlencode(params)}"
        client = Client(
            dest.secret("consumer_key"),
            client_secret=dest.secret("consumer_secret"),
            resource_owner_key=dest.secret("access_token"),
            resource_owner_secret=dest.secret("access_token_secret"),
            signature_method=SIGNATURE_HMAC_SHA1,
            signature_type=SIGNATURE_TYPE_AUTH_HEADER,
        )
        signed_url, headers, _ = client.sign(url, http_method=method)
        return OutgoingRequest(method, signed_url, url, dict(headers), None)

    def build_request(self, envelope: DeliveryEnvelope) -> OutgoingRequest | Skipped:
        params = self.params(envelope.require_event())
        if isinstance(params, Skipped):
            return params
        request = self._signed("POST", "conversion_event", params)
        request.headers["X-Idempotency-Key"] = envelope.delivery_id
        return request

    def build_check_request(self, event: ConversionEvent) -> OutgoingRequest | Skipped:
        """GET conversion_attribution: asks X what it would attribute, records nothing."""
        params = self.params(event)
        if isinstance(params, Skipped):
            return params
        return self._signed("GET", "conversion_attribution", params)

    def classify(self, answer: HttpAnswer, body_excerpt: str) -> Outcome:
        status = answer.status
        budget = _budget(answer)
        body = _json(body_excerpt)
        if 200 <= status < 300:
            data = body.get("data") if isinstance(body, dict) else None
            attribution = None
            if isinstance(data, dict):
                attribution = {
                    "twitter_attribution": data.get("twitter_attribution"),
                    "tpn_attribution": data.get("tpn_attribution"),
                }
            return Delivered(status, body_excerpt, attribution, budget)
        reason = f"HTTP {status} {_x_errors(body)}".rstrip()
        if status == 429:
            wait = retry_after_seconds(answer.header("Retry-After"))
            if wait is None and budget is not None:
                wait = max(0.0, budget.reset_at - time.time())
            return RetryLater(reason, status, body_excerpt, wait, budget)
        if status >= 500 or status in {408, 425}:
            wait = retry_after_seconds(answer.header("Retry-After"))
            return RetryLater(reason, status, body_excerpt, wait, budget)
        if status == 401:
            return PermanentFailure(
                reason, status, body_excerpt, alarm=True,
                pause_seconds=UNAUTHORIZED_PAUSE_SECONDS, budget=budget,
            )  # fmt: skip
        return PermanentFailure(reason, status, body_excerpt, alarm=status == 403, budget=budget)


def _json(excerpt: str) -> Any:
    try:
        return json.loads(excerpt)
    except ValueError:
        return None  # X sends HTML for some errors (404): the status decides then


def _x_errors(body: Any) -> str:
    """'INVALID_PARAMETER (hashed_device_id): message' for each of X's errors."""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return ""
    parts = []
    for err in body["errors"][:3]:
        if isinstance(err, dict):
            code = str(err.get("code", "?"))
            param = f" ({err['parameter']})" if err.get("parameter") else ""
            message = str(err.get("message", ""))[:200]
            parts.append(f"{code}{param}: {message}" if message else f"{code}{param}")
    return "; ".join(parts)


def _budget(answer: HttpAnswer) -> RateBudget | None:
    remaining, reset = answer.header("x-rate-limit-remaining"), answer.header("x-rate-limit-reset")
    if remaining is None or reset is None:
        return None
    try:
        return RateBudget(int(remaining), float(reset))
    except ValueError:
        return None
