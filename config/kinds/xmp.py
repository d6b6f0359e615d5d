"""The `xmp` kind: Mobvista XMP S2S postbacks, its channels and the media-source mapping."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from config.destination_base import DestinationBase, RetryPolicy

XMP_CHANNELS = (
    "organic", "tiktok", "kwai", "huawei_global", "apple", "mintegral", "applovin", "unity",
    "ironsource", "vungle",
)  # fmt: skip
# AppsFlyer media sources (pid) to XMP channels; a destination's channel_map adds to this.
DEFAULT_XMP_CHANNEL_MAP: dict[str, str] = {
    "organic": "organic", "tiktokglobal_int": "tiktok", "bytedanceglobal_int": "tiktok",
    "tiktok_int": "tiktok", "kwai_int": "kwai", "huawei_int": "huawei_global",
    "Apple Search Ads": "apple", "apple_search_ads": "apple", "mintegral_int": "mintegral",
    "applovin_int": "applovin", "unityads_int": "unity", "ironsource_int": "ironsource",
    "vungle_int": "vungle", "liftoff_int": "vungle",
}  # fmt: skip


class XmpDestination(DestinationBase):
    """Mobvista XMP S2S postback v2: running daily aggregates, flushed in batches of <= 200."""

    kind: Literal["xmp"]
    url: str = Field(
        default="https://xmp-postback.mobvista.com/s2s/postback/v2",
        pattern=r"^https?://[^\s?#]+$",
    )
    timezone: str = Field(default="UTC+0", pattern=r"^UTC[+-](?:[0-9]|1[0-2])$")
    include_timezone: bool = False
    include_subsource: bool = False  # subsource_id from the event's site_id
    channel_map: dict[str, str] = Field(default_factory=dict)
    extra_channels: list[str] = Field(default_factory=list)
    event_value: Literal["revenue", "none"] = "revenue"
    flush_interval_seconds: float = Field(default=60.0, ge=1, le=3600)
    batch_size: int = Field(default=200, ge=1, le=200)
    retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(max_attempts=2, schedule=[10, 20], jitter=0.1)
    )

    @model_validator(mode="after")
    def _xmp_rules(self) -> XmpDestination:
        if "xmp_token" not in self.credentials:
            raise ValueError("credentials: xmp needs xmp_token (env or file)")
        allowed = set(XMP_CHANNELS) | set(self.extra_channels)
        for source, channel in self.channel_map.items():
            if channel not in allowed:
                raise ValueError(
                    f"channel_map.{source}: {channel!r} is not an XMP channel "
                    f"({', '.join(sorted(allowed))}); add it to extra_channels if XMP confirmed it"
                )
        return self

    @property
    def channels(self) -> dict[str, str]:
        return {**DEFAULT_XMP_CHANNEL_MAP, **self.channel_map}

    @property
    def allowed_channels(self) -> frozenset[str]:
        return frozenset(XMP_CHANNELS) | frozenset(self.extra_channels)

    @property
    def utc_offset_hours(self) -> int:
        return int(self.timezone.removeprefix("UTC"))
