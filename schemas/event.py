"""The normalized ConversionEvent every producer sends; bad input fails here, naming the field."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import pycountry
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyAddress,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.errors import InvalidEvent

INSTALL_EVENT = "install"

_IOS_APP_ID = re.compile(r"^(?:id)?([0-9]{1,12})$")
_ANDROID_PACKAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)+$")
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _uuid_string(value: str) -> str:
    try:
        uuid.UUID(value)
    except ValueError:
        raise ValueError("must be a UUID like 6D92078A-8246-4BA4-AE5B-76104861E7DC") from None
    if len(value) != 36:
        raise ValueError("must be a UUID in its 36-character hyphenated form")
    return value  # case kept as received: hashing destinations decide their own normalisation


def _android_id(value: str) -> str:
    if not (_HEX.match(value) and 1 <= len(value) <= 64):
        raise ValueError("must be 1 to 64 hexadecimal characters")
    return value


def _oaid(value: str) -> str:
    if _HEX.match(value) and 16 <= len(value) <= 64:
        return value
    return _uuid_string(value)


def _country(value: str) -> str:
    code = value.upper()
    if len(code) != 2 or pycountry.countries.get(alpha_2=code) is None:
        raise ValueError("must be an ISO 3166-1 alpha-2 country code like US")
    return code


def _currency(value: str) -> str:
    code = value.upper()
    if len(code) != 3 or pycountry.currencies.get(alpha_3=code) is None:
        raise ValueError("must be an ISO 4217 currency code like USD")
    return code


def _finite(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError("must be a finite number")
    return value


def _strip_blank(value: Any) -> Any:
    """Producers often send "" for "unknown"; treat it as absent rather than as a bad value."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
DeviceUuid = Annotated[str, AfterValidator(_uuid_string)]
Money = Annotated[
    Decimal,
    Field(max_digits=20, decimal_places=6),
    AfterValidator(_finite),
    PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json"),
]


Blank = BeforeValidator(_strip_blank)
Text64 = Annotated[Annotated[str, Field(max_length=64)] | None, Blank]
Text128 = Annotated[Annotated[str, Field(max_length=128)] | None, Blank]
Text256 = Annotated[Annotated[str, Field(max_length=256)] | None, Blank]
OptUuid = Annotated[DeviceUuid | None, Blank]
OptTime = Annotated[UtcDatetime | None, Blank]
OptMoney = Annotated[Money | None, Blank]


class ConversionEvent(BaseModel):
    """An install or in-app event, normalized: times in UTC, codes upper-case, ids validated."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    event_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[\x21-\x7e]+$",
        description="Idempotency key; derived from the content when absent.",
    )
    app_id: str = Field(min_length=1, max_length=255)
    platform: Literal["ios", "android"]
    event_name: str = Field(min_length=1, max_length=100)
    event_time: UtcDatetime
    install_time: OptTime = None

    idfa: OptUuid = None
    idfv: OptUuid = None
    gaid: OptUuid = None
    android_id: Annotated[Annotated[str, AfterValidator(_android_id)] | None, Blank] = None
    oaid: Annotated[Annotated[str, AfterValidator(_oaid)] | None, Blank] = None

    ip: Annotated[IPvAnyAddress | None, Blank] = None
    user_agent: Annotated[Annotated[str, Field(max_length=1024)] | None, Blank] = None
    country: Annotated[Annotated[str, AfterValidator(_country)] | None, Blank] = None
    language: Annotated[
        Annotated[str, Field(max_length=35, pattern=_LANGUAGE.pattern)] | None, Blank
    ] = None
    os_version: Text64 = None
    device_model: Text128 = None
    app_version: Text64 = None

    media_source: Annotated[Annotated[str, Field(max_length=100)] | None, Blank] = None
    campaign: Text256 = None
    campaign_id: Text128 = None
    adset_id: Text128 = None
    ad_id: Text128 = None
    site_id: Text256 = None
    click_id: Annotated[Annotated[str, Field(max_length=512)] | None, Blank] = None
    touch_type: Annotated[Literal["click", "impression"] | None, Blank] = None
    touch_time: OptTime = None

    revenue: OptMoney = None
    currency: Annotated[Annotated[str, AfterValidator(_currency)] | None, Blank] = None
    revenue_usd: OptMoney = None

    # Keys are the partner's own names: never stripped, so two keys cannot silently merge.
    event_values: dict[Annotated[str, StringConstraints(strip_whitespace=False)], Any] = Field(
        default_factory=dict
    )

    @field_validator("platform", mode="before")
    @classmethod
    def _platform_lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("event_values")
    @classmethod
    def _event_values_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            encoded = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError):
            raise ValueError("must be a JSON object (strings, numbers, lists, objects)") from None
        if len(encoded) > 16_384:
            raise ValueError("must encode to at most 16384 bytes of JSON")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ConversionEvent:
        app_id = self._normalized_app_id()
        if app_id != self.app_id:
            object.__setattr__(self, "app_id", app_id)
        if self.revenue is not None and self.currency is None:
            raise ValueError("currency: required when revenue is set")
        if self.platform == "ios" and (self.gaid or self.android_id):
            raise ValueError("gaid/android_id: not allowed on an ios event")
        if self.platform == "android" and (self.idfa or self.idfv):
            raise ValueError("idfa/idfv: not allowed on an android event")
        if self.event_id is None:
            object.__setattr__(self, "event_id", self._content_id())
        return self

    def _normalized_app_id(self) -> str:
        if self.platform == "ios":
            match = _IOS_APP_ID.match(self.app_id)
            if not match:
                raise ValueError(
                    "app_id: an ios app id is the App Store id, like id123456789 or 123456789"
                )
            return "id" + match.group(1)
        if not _ANDROID_PACKAGE.match(self.app_id):
            raise ValueError("app_id: an android app id is a package name, like com.example.game")
        return self.app_id

    def _content_id(self) -> str:
        """Same content, same id: a producer retrying without an event_id is still deduplicated."""
        content = self.model_dump(mode="json", exclude={"event_id"})
        for money in ("revenue", "revenue_usd"):  # 1.5 and 1.50 are the same amount
            value = getattr(self, money)
            if value is not None:
                content[money] = format(value.normalize(), "f")
        digest = hashlib.sha256(
            json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        return f"sha256:{digest[:48]}"

    @property
    def is_install(self) -> bool:
        return self.event_name == INSTALL_EVENT

    @property
    def store_app_id(self) -> str:
        """The app id as store APIs want it: digits for iOS, the package name for Android."""
        return self.app_id.removeprefix("id") if self.platform == "ios" else self.app_id

    @property
    def advertising_id(self) -> str | None:
        return self.idfa if self.platform == "ios" else self.gaid

    @classmethod
    def parse(cls, data: ConversionEvent | dict[str, Any]) -> ConversionEvent:
        """Validate a dict (or pass a model through); raise InvalidEvent naming each bad field."""
        if isinstance(data, ConversionEvent):
            return data
        if not isinstance(data, dict):
            raise InvalidEvent(f"invalid event: expected a dict, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidEvent.from_validation_error(exc) from None
