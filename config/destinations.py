"""The destinations file: every destination, its credentials by reference, limits, retries, routes.

Loaded and validated once when a process starts. Anything wrong (an unknown kind or macro, a bad
URL) raises ConfigError naming the destination and the field, so the process stops before it
accepts or delivers anything.

Loading reads no secret: producers, beat, Flower and the read-only commands route and report
with the file alone and never hold a partner's credentials (ARCHITECTURE rule 9). A process that
sends asks for the secrets of what it sends to with ``Destinations.with_secrets``; a secret that
cannot be read stops it there, and using a secret that was never read raises SecretsNotResolved.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import random
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

import limits
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.errors import PostbackRelayError, describe_validation_error
from schemas.event import ConversionEvent
from schemas.macros import Template, TemplateError, compile_template, compile_url_template

_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
_IOS_NUMERIC = re.compile(r"^\d{1,12}$")


class ConfigError(PostbackRelayError):
    """The destinations file or settings cannot be used; the message says where and why."""


class SecretsNotResolved(PostbackRelayError, RuntimeError):
    """A credential was used in a process that never read it: a bug, never an empty value."""


# The reconciler runs on the queue of the kind it redelivers to (workers/app.py), so the workers
# of that queue, and the `reconcile` command, are the ones that read an AppMetrica token.
RECONCILE_KIND = "redeliver"


@dataclasses.dataclass(frozen=True)
class SecretUse:
    """One credential reference: whose it is, and the kind whose workers send with it."""

    section: Literal["destination", "reconcile"]
    owner_name: str
    name: str  # the credential's name: "api_key", or "token" for a reconcile source
    field: str  # where it is in the file: "credentials.api_key", "token"
    ref: SecretRef
    kind: str
    _read: Callable[[Mapping[str, str]], SecretStr] = dataclasses.field(repr=False, compare=False)

    @property
    def owner(self) -> str:
        return f"{self.section} {self.owner_name!r}"

    def read(self, environ: Mapping[str, str]) -> SecretStr:
        """The value; ConfigError naming the owner, the field and the variable or file."""
        try:
            return self._read(environ)
        except ValueError as exc:
            raise ConfigError(f"{self.owner}: {self.field}: {exc}") from None


class SecretRef(BaseModel):
    """A credential by reference: an environment variable or a file (Docker/K8s secrets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError('give exactly one of env = "VAR" or file = "/path"')
        return self

    def describe(self) -> str:
        return f"env {self.env}" if self.env is not None else f"file {self.file}"

    def resolve(self, environ: Mapping[str, str]) -> SecretStr:
        if self.env is not None:
            value = environ.get(self.env)
            if not value:
                raise ValueError(f"environment variable {self.env} is not set or is empty")
            return SecretStr(value)
        assert self.file is not None
        try:
            value = self.file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"secret file {self.file} cannot be read ({exc.strerror})") from None
        if not value:
            raise ValueError(f"secret file {self.file} is empty")
        return SecretStr(value)


class RetryPolicy(BaseModel):
    """When to try again. ``max_attempts`` counts redeliveries after the first send, as Kochava's
    ``max_delivery_attempts`` does (0 = do not retry, up to 10)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=5, ge=0, le=10)
    base_seconds: float = Field(default=30.0, gt=0)
    factor: float = Field(default=2.0, ge=1)
    cap_seconds: float = Field(default=3600.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, le=1, description="+- share of the delay")
    schedule: list[Annotated[float, Field(ge=0)]] | None = Field(default=None, max_length=10)
    max_age_seconds: float = Field(default=86_400.0, gt=0)

    def delay_for(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before redelivery ``retry_number`` (1-based). Pure, tested alone."""
        if self.schedule:
            base = self.schedule[min(retry_number, len(self.schedule)) - 1]
        else:
            base = min(self.cap_seconds, self.base_seconds * self.factor ** (retry_number - 1))
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base)


class Timeouts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    connect: float = Field(default=3.05, gt=0, le=60)
    read: float = Field(default=10.0, gt=0, le=120)


class Route(BaseModel):
    """Which events a destination receives (Kochava's postback trigger model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["install", "event"]
    events: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, description="event names; empty = every in-app event"
    )
    apps: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        default_factory=list, description="app ids; empty = every app"
    )
    delay_seconds: float = Field(default=0, ge=0, le=600)
    max_delivery_attempts: int | None = Field(default=None, ge=0, le=10)
    active: bool = True

    @field_validator("apps")
    @classmethod
    def _normalize_apps(cls, apps: list[str]) -> list[str]:
        return ["id" + a if _IOS_NUMERIC.match(a) else a for a in apps]

    @model_validator(mode="after")
    def _install_has_no_event_filter(self) -> Route:
        if self.type == "install" and self.events:
            raise ValueError("events: an install route matches installs only; remove the filter")
        return self

    def matches(self, event: ConversionEvent) -> bool:
        if not self.active:
            return False
        if self.apps and event.app_id not in self.apps:
            return False
        if self.type == "install":
            return event.is_install
        return not event.is_install and (not self.events or event.event_name in self.events)


class DestinationBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str = Field(pattern=_NAME)
    credentials: dict[str, SecretRef] = Field(default_factory=dict)
    rate_limit: str | None = Field(
        default=None, description='e.g. "50/second" or "60000 per 15 minutes" (limits syntax)'
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: Timeouts = Field(default_factory=Timeouts)
    routes: list[Route] = Field(min_length=1)
    active: bool = True

    # None until this process reads them (with_secrets); a producer's copy stays None.
    _secrets: dict[str, SecretStr] | None = PrivateAttr(default=None)

    @field_validator("rate_limit")
    @classmethod
    def _parse_rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                limits.parse(value)
            except ValueError:
                raise ValueError(
                    'must read like "50/second", "1000 per minute" or "60000 per 15 minutes"'
                ) from None
        return value

    @property
    def rate_limit_item(self) -> limits.RateLimitItem | None:
        return limits.parse(self.rate_limit) if self.rate_limit else None

    def secret(self, name: str) -> str:
        return self._read_secrets()[name].get_secret_value()

    def secret_values(self) -> dict[str, str]:
        return {k: v.get_secret_value() for k, v in self._read_secrets().items()}

    def secrets_to_mask(self) -> list[str]:
        """The secrets of this destination this process holds (none if it never read them):
        what must be masked out of anything it logs or stores."""
        return [v.get_secret_value() for v in (self._secrets or {}).values()]

    def _read_secrets(self) -> dict[str, SecretStr]:
        if self._secrets is None and self.credentials:
            raise SecretsNotResolved(
                f"destination {self.name!r}: its credentials were not read in this process; "
                "only the processes that send to it read them (Destinations.with_secrets)"
            )
        return self._secrets or {}  # a destination without credentials has nothing to read

    def secret_uses(self) -> list[SecretUse]:
        uses = []
        for name, ref in self.credentials.items():
            read = partial(self._read_secret, name)
            uses.append(SecretUse("destination", self.name, name, f"credentials.{name}", ref,
                                  self.kind, read))  # fmt: skip
        return uses

    def _read_secret(self, name: str, environ: Mapping[str, str]) -> SecretStr:
        value = self.credentials[name].resolve(environ)
        self.check_secret(name, value.get_secret_value())
        return value

    def with_secrets(self, environ: Mapping[str, str]) -> Self:
        """A copy holding its credentials; ConfigError on the first that cannot be read."""
        resolved = {use.name: use.read(environ) for use in self.secret_uses()}
        copy = self.model_copy()
        copy._secrets = resolved
        return copy

    def check_secret(self, name: str, value: str) -> None:
        """Kinds with a format for a credential check it here, when it is read; never echo it."""

    def route_for(self, event: ConversionEvent) -> Route | None:
        if not self.active:
            return None
        return next((r for r in self.routes if r.matches(event)), None)


class TemplatedDestination(DestinationBase):
    """Any partner that hands over a postback URL template with macros."""

    kind: Literal["templated"]
    url: str = Field(min_length=8, max_length=4096)
    method: Literal["GET", "POST"] = "GET"
    body: dict[str, str] | None = Field(
        default=None, description="POST body fields; values are templates"
    )
    body_format: Literal["json", "form"] = "json"
    headers: dict[str, str] = Field(default_factory=dict)

    _url: Template = PrivateAttr()
    _body: dict[str, Template] = PrivateAttr(default_factory=dict)
    _headers: dict[str, Template] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _compile_templates(self) -> TemplatedDestination:
        creds = frozenset(self.credentials)
        field = "url"
        try:
            self._url = compile_url_template(self.url, creds)
            for key, text in (self.body or {}).items():
                field = f"body.{key}"
                self._body[key] = compile_template(text, creds)
            for key, text in self.headers.items():
                field = f"headers.{key}"
                header = compile_template(text, creds)
                if header.uses_event:
                    raise TemplateError("headers may use (credential:NAME) macros only")
                self._headers[key] = header
        except TemplateError as exc:
            raise ValueError(f"{field}: {exc}") from None
        if self.body is not None and self.method != "POST":
            raise ValueError('body: a body template needs method = "POST"')
        return self

    @property
    def url_template(self) -> Template:
        return self._url

    @property
    def body_templates(self) -> dict[str, Template]:
        return self._body

    @property
    def header_templates(self) -> dict[str, Template]:
        return self._headers


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


Destination = TemplatedDestination | XMactDestination | XmpDestination | RedeliverDestination
KINDS: dict[str, type[DestinationBase]] = {
    "templated": TemplatedDestination,
    "x_mact": XMactDestination,
    "xmp": XmpDestination,
    "redeliver": RedeliverDestination,
}


class ReconcileSource(BaseModel):
    """An AppMetrica application whose postbacks export the reconciler reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    application_id: str = Field(pattern=r"^[0-9]{1,20}$")
    token: SecretRef
    redeliver_to: str = Field(pattern=_NAME, description="a destination of kind redeliver")
    base_url: str = Field(
        default="https://api.appmetrica.yandex.com", pattern=r"^https?://[^/?#\s]+$"
    )
    date_dimension: Literal["default", "receive"] = "default"
    interval_seconds: float = Field(default=3600, ge=10)
    overlap_seconds: float = Field(default=3600, ge=0)
    settle_seconds: float = Field(default=600, ge=0)
    first_look_back_seconds: float = Field(default=86_400, gt=0)
    poll_seconds: float = Field(default=30, ge=1, le=600)
    retention_days: int = Field(default=30, ge=1, le=365)
    timeout: Timeouts = Field(default_factory=Timeouts)
    active: bool = True

    _token: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _retention_covers_the_window(self) -> ReconcileSource:
        window = self.overlap_seconds + self.settle_seconds + self.first_look_back_seconds
        if self.retention_days * 86_400 <= window:
            raise ValueError(
                "retention_days: must outlast the look-back window, or a postback could be "
                "redelivered twice"
            )
        return self

    def secret_uses(self) -> list[SecretUse]:
        return [SecretUse("reconcile", self.name, "token", "token", self.token, RECONCILE_KIND,
                          self.token.resolve)]  # fmt: skip

    def with_secrets(self, environ: Mapping[str, str]) -> Self:
        """A copy holding its token; ConfigError when it cannot be read."""
        (use,) = self.secret_uses()
        copy = self.model_copy()
        copy._token = use.read(environ)
        return copy

    def token_value(self) -> str:
        if self._token is None:
            raise SecretsNotResolved(
                f"reconcile {self.name!r}: its token was not read in this process; only the "
                "processes that run the reconciler read it (Destinations.with_secrets)"
            )
        return self._token.get_secret_value()

    def secrets_to_mask(self) -> list[str]:
        return [] if self._token is None else [self._token.get_secret_value()]


class Destinations:
    """The validated destinations file, with routing."""

    def __init__(
        self,
        destinations: Iterable[DestinationBase],
        source: str = "",
        reconcile: Iterable[ReconcileSource] = (),
    ) -> None:
        self.by_name: dict[str, DestinationBase] = {}
        for dest in destinations:
            if dest.name in self.by_name:
                raise ConfigError(f"{source}: destination {dest.name!r}: name: used twice")
            self.by_name[dest.name] = dest
        self.source = source
        self.reconcile: dict[str, ReconcileSource] = {}
        for rec in reconcile:
            target = self.by_name.get(rec.redeliver_to)
            if target is None or target.kind != "redeliver":
                raise ConfigError(
                    f"{source}: reconcile {rec.name!r}: redeliver_to: {rec.redeliver_to!r} "
                    "must name a destination of kind redeliver"
                )
            if rec.name in self.reconcile:
                raise ConfigError(f"{source}: reconcile {rec.name!r}: name: used twice")
            self.reconcile[rec.name] = rec

    def __iter__(self) -> Iterator[DestinationBase]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> DestinationBase:
        return self.by_name[name]

    @property
    def kinds(self) -> set[str]:
        return {d.kind for d in self}

    def _secret_owners(self) -> list[DestinationBase | ReconcileSource]:
        return [*self, *self.reconcile.values()]

    def secret_uses(self) -> list[SecretUse]:
        """Every credential reference in the file, with the kind whose workers send with it."""
        return [use for owner in self._secret_owners() for use in owner.secret_uses()]

    def with_secrets(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        kinds: Iterable[str] = (),
        destinations: Iterable[str] = (),
        reconcile: Iterable[str] = (),
    ) -> Destinations:
        """A copy in which what a sending process sends to holds its secrets: destinations of
        ``kinds`` (and every reconcile source when the redeliver kind is among them, since the
        reconciler runs there), and those named. The rest stay without: using one of their
        secrets raises SecretsNotResolved. ConfigError names the destination and the variable
        or file of the first secret that cannot be read."""
        environ = os.environ if environ is None else environ
        kinds, names, sources = set(kinds), set(destinations), set(reconcile)
        try:
            dests = [
                d.with_secrets(environ) if d.kind in kinds or d.name in names else d for d in self
            ]
            recs = [
                r.with_secrets(environ) if RECONCILE_KIND in kinds or r.name in sources else r
                for r in self.reconcile.values()
            ]
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        return Destinations(dests, self.source, recs)

    def secrets_held(self) -> list[str]:
        """Every secret this process has read: for log redaction and masking."""
        return [value for owner in self._secret_owners() for value in owner.secrets_to_mask()]

    def routes_for(self, event: ConversionEvent) -> list[tuple[DestinationBase, Route]]:
        """Every destination that wants this event, each with the first route that matched."""
        matched = []
        for dest in self.by_name.values():
            route = dest.route_for(event)
            if route is not None:
                matched.append((dest, route))
        return matched


def check_timeouts_nest(destinations: Destinations, max_connect: float, max_read: float) -> None:
    """Each destination's HTTP timeouts must fit under the process's (which nest below the task
    limits), so no delivery can outlive its task's time limit or the visibility timeout."""
    for dest in destinations:
        for field, value, limit in (
            ("timeout.connect", dest.timeout.connect, max_connect),
            ("timeout.read", dest.timeout.read, max_read),
        ):
            if value > limit:
                setting = "POSTBACK_RELAY_HTTP_" + field.split(".")[1].upper() + "_TIMEOUT"
                raise ConfigError(
                    f"{destinations.source}: destination {dest.name!r}: {field}: {value:g}s is "
                    f"longer than {setting} ({limit:g}s); raise it together with the task limits"
                )


def parse_destinations(data: Mapping[str, Any], source: str = "destinations") -> Destinations:
    """Validate the file's content; no secret is read (see Destinations.with_secrets)."""
    unknown = set(data) - {"destination", "reconcile"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}; use [[destination]] "
            "and [[reconcile]]"
        )
    entries = data.get("destination", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: destination: must be an array of tables ([[destination]])")
    parsed = []
    for index, entry in enumerate(entries):
        label = f"#{index + 1}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label = repr(entry["name"])
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: destination {label}: must be a table")
        model = KINDS.get(entry.get("kind"))  # type: ignore[arg-type]
        if model is None:
            raise ConfigError(
                f"{source}: destination {label}: kind: must be one of {', '.join(KINDS)}"
                f" (got {entry.get('kind')!r})"
            )
        try:
            dest = model.model_validate(entry)
        except ValidationError as exc:
            detail = describe_validation_error(exc)
            raise ConfigError(f"{source}: destination {label}: {detail}") from None
        parsed.append(dest)
    return Destinations(parsed, source, _parse_reconcile(data.get("reconcile", []), source))


def _parse_reconcile(entries: Any, source: str) -> list[ReconcileSource]:
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: reconcile: must be an array of tables ([[reconcile]])")
    parsed = []
    for index, entry in enumerate(entries):
        label = (
            repr(entry["name"]) if isinstance(entry, dict) and "name" in entry else f"#{index + 1}"
        )
        try:
            rec = ReconcileSource.model_validate(entry)
        except ValidationError as exc:
            raise ConfigError(
                f"{source}: reconcile {label}: {describe_validation_error(exc)}"
            ) from None
        parsed.append(rec)
    return parsed


def load_destinations(path: Path) -> Destinations:
    """Read and validate the destinations file, reading no secret; ConfigError on any problem.
    A process that sends then calls ``with_secrets`` for what it sends to."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"destinations file {path}: cannot be read ({exc.strerror}); "
            "set POSTBACK_RELAY_DESTINATIONS_FILE or see config/destinations.example.toml"
        ) from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"destinations file {path}: not valid TOML ({exc})") from None
    return parse_destinations(data, str(path))
