"""AppMetrica's postbacks export (Logs API): the fields we ask for and one row as it comes."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

EXPORT_FIELDS = (
    "application_id", "postback_url", "conversion_timestamp", "event_name", "cost_model",
    "notifying_status", "attempt_timestamp", "response_code", "google_aid", "ios_ifa",
    "appmetrica_device_id", "click_id",
)  # fmt: skip
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _blank_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


class ExportRow(BaseModel):
    """One attempt row. The docs say integers; the official example sends strings: both parse."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True, str_strip_whitespace=True)

    application_id: str = ""
    postback_url: str = Field(min_length=1)
    conversion_timestamp: int = Field(ge=0)
    event_name: str = ""
    cost_model: str = ""
    notifying_status: Literal["sent", "failed"]
    attempt_timestamp: Annotated[int | None, BeforeValidator(_blank_to_none)] = None
    response_code: Annotated[int | None, BeforeValidator(_blank_to_none)] = None
    google_aid: str = ""
    ios_ifa: str = ""
    appmetrica_device_id: str = ""
    click_id: str = ""

    @property
    def identity(self) -> str:
        """One postback: its URL, conversion time, device (or click) and cost model."""
        who = self.google_aid or self.ios_ifa or self.appmetrica_device_id or self.click_id
        raw = "\n".join([self.postback_url, str(self.conversion_timestamp), who, self.cost_model])
        return hashlib.sha256(raw.encode()).hexdigest()[:40]
