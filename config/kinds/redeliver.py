"""The `redeliver` kind: sends again postback URLs another system failed to deliver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from config.destination_base import DestinationBase, Route
from schemas.event import ConversionEvent


class RedeliverDestination(DestinationBase):
    """Sends again, by GET, postback URLs another system failed to deliver (the reconciler).

    The URLs come from outside (an export), so they are checked before anything is sent:
    http/https only, and hosts resolving to loopback, private, link-local or otherwise
    non-public addresses are refused unless ``allow_private`` is set (the sandbox, tests).
    """

    kind: Literal["redeliver"]
    routes: list[Route] = Field(default_factory=list, max_length=0)
    allow_private: bool = False
    host_allowlist: list[str] = Field(default_factory=list)
    rate_limit: str | None = "10/second"  # per target host

    def route_for(self, event: ConversionEvent) -> Route | None:
        return None  # produce() never routes here; only the reconciler enqueues
