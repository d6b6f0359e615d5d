"""The `x_mact` kind: X (Twitter) Mobile App Conversion Tracking, its credentials and the
conversion types X accepts, with the default mapping from event names."""

from __future__ import annotations

import base64
from typing import Literal, get_args

from pydantic import Field, model_validator

from config.destination_base import DestinationBase, Route
from schemas.event import ConversionEvent

XConversionType = Literal[
    "PURCHASE", "SIGN_UP", "INSTALL", "RE_ENGAGE", "UPDATE", "TUTORIAL_COMPLETE", "RESERVATION",
    "ADD_TO_CART", "ADD_TO_WISHLIST", "LOGIN", "CHECKOUT_INITIATED", "SEARCH", "LEVEL_ACHIEVED",
    "ACHIEVEMENT_UNLOCKED", "CONTENT_VIEW", "SHARE", "INVITE", "ADDED_PAYMENT_INFO",
    "SPENT_CREDITS", "RATED",
]  # fmt: skip
X_CONVERSION_TYPES: tuple[str, ...] = get_args(XConversionType)

# AppsFlyer's and plain event names to X's enum; a destination's conversion_types adds to this.
DEFAULT_X_CONVERSIONS: dict[str, str] = {
    "install": "INSTALL",
    "af_purchase": "PURCHASE", "purchase": "PURCHASE",
    "af_complete_registration": "SIGN_UP", "sign_up": "SIGN_UP",
    "af_tutorial_completion": "TUTORIAL_COMPLETE", "tutorial_complete": "TUTORIAL_COMPLETE",
    "af_level_achieved": "LEVEL_ACHIEVED", "level_achieved": "LEVEL_ACHIEVED",
    "af_add_to_cart": "ADD_TO_CART", "add_to_cart": "ADD_TO_CART",
    "af_add_to_wishlist": "ADD_TO_WISHLIST", "af_login": "LOGIN", "login": "LOGIN",
    "af_initiated_checkout": "CHECKOUT_INITIATED", "af_search": "SEARCH",
    "af_achievement_unlocked": "ACHIEVEMENT_UNLOCKED", "af_content_view": "CONTENT_VIEW",
    "af_share": "SHARE", "af_invite": "INVITE", "af_add_payment_info": "ADDED_PAYMENT_INFO",
    "af_spent_credits": "SPENT_CREDITS", "af_rate": "RATED", "af_re_engage": "RE_ENGAGE",
    "af_update": "UPDATE", "af_reservation": "RESERVATION",
}  # fmt: skip
X_CREDENTIALS = ("consumer_key", "consumer_secret", "access_token", "access_token_secret",
                 "partner_key")  # fmt: skip


class XMactDestination(DestinationBase):
    """X (Twitter) Mobile App Conversion Tracking: signed conversion_event calls."""

    kind: Literal["x_mact"]
    base_url: str = Field(default="https://ads-api.x.com", pattern=r"^https?://[^/?#\s]+$")
    api_version: str = Field(default="12", pattern=r"^[0-9]{1,3}$")
    conversion_types: dict[str, XConversionType] = Field(default_factory=dict)
    use_default_conversion_types: bool = True
    click_window: Literal[1, 7, 14, 30] = 14
    view_through_window: Literal[0, 1, 7, 14, 30] = 1
    idfa_case: Literal["as_received", "upper", "lower"] = "as_received"
    level_key: str = "af_level"
    number_items_key: str = "af_quantity"
    rate_limit: str | None = "60000 per 15 minutes"

    @model_validator(mode="after")
    def _x_rules(self) -> XMactDestination:
        if self.view_through_window > self.click_window:
            raise ValueError(
                f"view_through_window: {self.view_through_window} may not exceed click_window "
                f"({self.click_window}), X rejects it"
            )
        missing = [c for c in X_CREDENTIALS if c not in self.credentials]
        if missing:
            raise ValueError(
                f"credentials: x_mact needs {', '.join(X_CREDENTIALS)}; "
                f"missing {', '.join(missing)}"
            )
        return self

    def check_secret(self, name: str, value: str) -> None:
        if name == "partner_key":
            try:
                if not base64.b64decode(value, validate=True):
                    raise ValueError
            except ValueError:
                raise ValueError(
                    "must be the base64 text X issued (it is base64-decoded to the HMAC key)"
                ) from None

    @property
    def conversion_map(self) -> dict[str, str]:
        base = dict(DEFAULT_X_CONVERSIONS) if self.use_default_conversion_types else {}
        return {**base, **self.conversion_types}

    def route_for(self, event: ConversionEvent) -> Route | None:
        """Events X has no conversion_type for are not routed to X at all."""
        if event.event_name not in self.conversion_map:
            return None
        return super().route_for(event)
