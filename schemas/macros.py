"""Postback templates with AppsFlyer ``(macro)`` and Adjust/Kochava ``{macro}`` names.

A template is compiled once when the destinations file is loaded, so an unknown macro or a macro
in the scheme or host stops the process at start-up instead of failing the first delivery.
Values are percent-encoded with nothing left "safe", so an event value can never add a path
segment, a query parameter, a fragment, or change the scheme or host; and a path segment that a
value makes "." or ".." has its dots sent as %2E, so the partner reads it as data, not as "this
level" or "up one level".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from urllib.parse import quote, urlsplit

from schemas.errors import PostbackRelayError
from schemas.event import ConversionEvent

MASK = "***"
_MACRO = re.compile(r"\(([A-Za-z][A-Za-z0-9_\- .:]{0,63})\)|\{([A-Za-z][A-Za-z0-9_\- .:]{0,63})\}")
_CREDENTIAL_PREFIX = "credential:"
# The path of a rendered URL template: the host is literal, so it ends at the first '?' or '#'.
_URL_PATH = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(?P<path>[^?#]*)")
# A dot segment as RFC 3986 5.2.4 and WHATWG's URL parser resolve it, in any spelling.
_DOT_SEGMENT = re.compile(r"(?:\.|%2[eE]){1,2}")


class TemplateError(PostbackRelayError, ValueError):
    """A template that cannot be used; the message names the macro or URL rule broken."""


@dataclass(frozen=True)
class DeliveryContext:
    """Values known only at delivery time, available to templates as macros."""

    delivery_id: str
    attempt: int


Getter = Callable[[ConversionEvent, DeliveryContext], str | None]


def _sha1(value: str | None) -> str | None:
    return hashlib.sha1(value.encode()).hexdigest() if value else None  # noqa: S324 - partner wire format


def iso_millis(value: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds, as X and most partners want: 2014-05-22T02:38:28.103Z."""
    return (
        value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
        if value
        else None
    )


def _unix(value: datetime | None) -> str | None:
    return str(int(value.timestamp())) if value else None


def _money(value: Decimal | None) -> str | None:
    return format(value, "f") if value is not None else None


def _json(values: Mapping[str, object]) -> str:
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False) if values else ""


def _field(name: str) -> Getter:
    def get(event: ConversionEvent, _: DeliveryContext) -> str | None:
        value = getattr(event, name)
        return None if value is None else str(value)

    return get


_TOUCH_FLAG = {"click": "0", "impression": "1"}  # AppsFlyer: 1 = impression, 0 = click

# Each entry: the macro's accepted names (compared after canonical()) and how to read it.
_TABLE: list[tuple[tuple[str, ...], Getter]] = [
    (("idfa",), _field("idfa")),
    (("sha1-idfa",), lambda e, _: _sha1(e.idfa)),
    (("idfv",), _field("idfv")),
    (("advertiserId", "advertising_id", "gaid"), _field("gaid")),
    (("sha1-advertiserId", "sha1-advertising_id", "sha1-gaid"), lambda e, _: _sha1(e.gaid)),
    (("android-id", "android_id"), _field("android_id")),
    (("sha1-android-id",), lambda e, _: _sha1(e.android_id)),
    (("oaid",), _field("oaid")),
    (("device-id",), lambda e, _: e.advertising_id),
    (("app-id", "app_id"), _field("app_id")),
    (("store-app-id",), lambda e, _: e.store_app_id),
    (("platform",), _field("platform")),
    (("ip", "device-ip"), _field("ip")),
    (("user-agent", "user_agent", "ua"), _field("user_agent")),
    (("country_code", "country"), _field("country")),
    (("language",), _field("language")),
    (("os-version", "os_version"), _field("os_version")),
    (("device-model", "device_model", "device_type"), _field("device_model")),
    (("app-version-name", "app_version", "app-version"), _field("app_version")),
    (("event-name", "event_name", "event"), _field("event_name")),
    (("event-value", "event_value", "encode", "json"), lambda e, _: _json(e.event_values)),
    (("event_id",), _field("event_id")),
    (("event-time", "event_time"), lambda e, _: iso_millis(e.event_time)),
    (("timestamp", "event-unix-ts", "event_unix_ts"), lambda e, _: _unix(e.event_time)),
    (("install-time", "install_time"), lambda e, _: iso_millis(e.install_time)),
    (("install-unix-ts", "install_unix_ts"), lambda e, _: _unix(e.install_time)),
    (("currency", "event_revenue_currency"), _field("currency")),
    (("monetary", "revenue", "event_revenue"), lambda e, _: _money(e.revenue)),
    (("event_revenue_usd", "revenue-usd", "revenue_usd"), lambda e, _: _money(e.revenue_usd)),
    (("pid", "media_source", "media source", "channel"), _field("media_source")),
    (("c", "campaign", "campaign_name"), _field("campaign")),
    (("af_c_id", "campaign_id"), _field("campaign_id")),
    (("af_adset_id", "adset_id"), _field("adset_id")),
    (("af_ad_id", "ad_id"), _field("ad_id")),
    (("af_siteid", "site_id"), _field("site_id")),
    (("clickid", "click_id"), _field("click_id")),
    (("touch_type",), _field("touch_type")),
    (
        ("attributed_touch_type",),
        lambda e, _: _TOUCH_FLAG[e.touch_type] if e.touch_type else None,
    ),
    (("attributed_touch_time", "touch_time"), lambda e, _: iso_millis(e.touch_time)),
    (("delivery_id",), lambda _, c: c.delivery_id),
    (("attempt",), lambda _, c: str(c.attempt + 1)),
]


def canonical(name: str) -> str:
    """Macro names compare case-insensitively, with '-', '_' and ' ' treated as one."""
    return re.sub(r"[-_ ]", "_", name.strip().lower())


MACROS: dict[str, Getter] = {canonical(n): getter for names, getter in _TABLE for n in names}


@dataclass(frozen=True)
class _Macro:
    written: str
    getter: Getter | None
    credential: str | None


@dataclass(frozen=True)
class Template:
    """A compiled template: literal text and macros, rendered with or without encoding."""

    source: str
    parts: tuple[str | _Macro, ...]

    @property
    def credentials(self) -> frozenset[str]:
        return frozenset(p.credential for p in self.parts if isinstance(p, _Macro) and p.credential)

    @property
    def uses_event(self) -> bool:
        return any(isinstance(p, _Macro) and p.getter for p in self.parts)

    def render(
        self,
        event: ConversionEvent,
        context: DeliveryContext,
        secrets: Mapping[str, str],
        *,
        url_encode: bool,
        mask_secrets: bool = False,
    ) -> str:
        out: list[str] = []
        macro_at: list[int] = []  # where each macro's text starts in the output
        length = 0
        for part in self.parts:
            if isinstance(part, str):
                text = part
            elif part.credential is not None and mask_secrets:
                text = MASK
            else:
                if part.credential is not None:
                    value: str | None = secrets[part.credential]
                else:
                    assert part.getter is not None
                    value = part.getter(event, context)
                value = value or ""
                text = quote(value, safe="") if url_encode else value
            if not isinstance(part, str):
                macro_at.append(length)
            out.append(text)
            length += len(text)
        rendered = "".join(out)
        return _escape_dot_segments(rendered, macro_at) if url_encode else rendered


def _escape_dot_segments(url: str, macro_at: list[int]) -> str:
    """Write the dots of a path segment that holds a macro as %2E when it would read "." or "..".

    quote() leaves '.' alone, so a value "..", or "." next to a literal ".", or two macros "."
    and "." side by side, would make a dot segment that the HTTP client (urllib3) or the
    partner's server resolves: the request would go to another path. A macro's text never
    holds a '/', so each macro lies in exactly one segment.
    """
    match = _URL_PATH.match(url)
    if match is None or not macro_at:
        return url
    start, end = match.span("path")
    segments, segment_start = [], start
    for written in url[start:end].split("/"):
        segment_end = segment_start + len(written)
        holds_macro = any(segment_start <= at <= segment_end for at in macro_at)
        dots = holds_macro and _DOT_SEGMENT.fullmatch(written)
        segments.append(written.replace(".", "%2E") if dots else written)
        segment_start = segment_end + 1
    return url[:start] + "/".join(segments) + url[end:]


def compile_template(text: str, credentials: frozenset[str] = frozenset()) -> Template:
    """Split ``text`` into literals and macros; raise TemplateError on an unknown macro."""
    parts: list[str | _Macro] = []
    pos = 0
    for match in _MACRO.finditer(text):
        written = match.group(0)
        name = match.group(1) or match.group(2)
        if name.startswith(_CREDENTIAL_PREFIX):
            cred = name.removeprefix(_CREDENTIAL_PREFIX)
            if cred not in credentials:
                known = ", ".join(sorted(credentials)) or "none declared"
                raise TemplateError(
                    f"macro {written} names credential {cred!r}, which is not declared "
                    f"under credentials ({known})"
                )
            macro = _Macro(written, None, cred)
        else:
            getter = MACROS.get(canonical(name))
            if getter is None:
                raise TemplateError(
                    f"unknown macro {written}; known macros include (idfa), (advertiserId), "
                    "(event-name), (encode), (install-unix-ts) - see README 'Macros'"
                )
            macro = _Macro(written, getter, None)
        parts.append(text[pos : match.start()])
        parts.append(macro)
        pos = match.end()
    parts.append(text[pos:])
    return Template(text, tuple(p for p in parts if p != ""))


def compile_url_template(text: str, credentials: frozenset[str] = frozenset()) -> Template:
    """A URL template: http(s), a literal host, and macros only in the path, query or fragment."""
    template = compile_template(text, credentials)
    first_macro = _MACRO.search(text)
    literal_head = text if first_macro is None else text[: first_macro.start()]
    head = urlsplit(literal_head)
    if head.scheme not in {"http", "https"}:
        raise TemplateError("must be an http:// or https:// URL with a literal scheme")
    if not head.hostname:
        raise TemplateError("must name a literal host before any macro")
    after_host = literal_head.split("//", 1)[1][len(head.netloc) :]
    if first_macro is not None and not after_host:
        raise TemplateError(
            "a macro may not touch the host: put a '/', '?' or '#' between the host and any macro"
        )
    literals = "".join(p for p in template.parts if isinstance(p, str))
    if any(c.isspace() or not c.isprintable() for c in literals):
        raise TemplateError("must not contain whitespace or control characters outside macros")
    return template
