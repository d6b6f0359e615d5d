"""Postback URL templates: every documented macro renders the right value, encoded so that no
event value can change the URL's scheme, host, path segments, query parameters or fragment."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.produce import Producer
from schemas.event import ConversionEvent
from schemas.macros import (
    MACROS,
    DeliveryContext,
    TemplateError,
    canonical,
    compile_template,
    compile_url_template,
)
from workers.dev.receiver import PostbackReceiver, ReceivedRequest
from workers.runtime import WorkerRuntime

IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"
ANDROID_ID = "9aaeecc4455abcde"
CTX = DeliveryContext(delivery_id="0b7c6a1e-4c1e-5d2f-9a4b-1f2e3d4c5b6a", attempt=0)
BASE = "https://partner.example/pb?v="

EVENT_TIME_UTC = datetime(2024, 5, 1, 10, 0, 5, tzinfo=UTC)  # given as 12:00:05+02:00
INSTALL_TIME_UTC = datetime(2024, 4, 30, 23, 59, 59, tzinfo=UTC)  # given as 18:59:59-05:00


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


IOS_EVENT = ConversionEvent.model_validate(
    {
        "app_id": "123456789",
        "platform": "ios",
        "event_name": "af_purchase",
        "event_time": "2024-05-01T12:00:05+02:00",
        "install_time": "2024-04-30T18:59:59-05:00",
        "idfa": IDFA,
        "idfv": GAID,
        "ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X)",
        "country": "de",
        "language": "de-DE",
        "os_version": "17.4.1",
        "device_model": "iPhone15,2",
        "app_version": "3.2.1 (beta)",
        "media_source": "ads&co network",
        "campaign": "summer/sale?2024",
        "click_id": "ck#1=2&3",
        "touch_type": "impression",
        "revenue": "12.50",
        "currency": "eur",
        "event_values": {"af_quantity": 1, "af_content_id": "1107", "note": "ü & ü=?#"},
    }
)

ANDROID_EVENT = ConversionEvent.model_validate(
    {
        "app_id": "com.example.game",
        "platform": "android",
        "event_name": "install",
        "event_time": "2024-05-01T12:00:05+02:00",
        "install_time": "2024-04-30T18:59:59-05:00",
        "gaid": GAID,
        "android_id": ANDROID_ID,
        "oaid": "0123456789abcdef",
        "ip": "2001:db8::1",
        "user_agent": "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8)",
        "country": "BR",
        "language": "pt_BR",
        "os_version": "14",
        "device_model": "Pixel 8",
        "app_version": "1.0.0",
        "media_source": "googleadwords_int",
        "click_id": "abc123",
        "touch_type": "click",
    }
)

MINIMAL_EVENT = ConversionEvent.model_validate(
    {
        "app_id": "com.example.game",
        "platform": "android",
        "event_name": "install",
        "event_time": "2024-05-01T12:00:05+02:00",
    }
)


def render_value(macro: str, event: ConversionEvent, *, url_encode: bool = True) -> str:
    """What ``macro`` becomes when it is the last thing in a URL template."""
    url = compile_url_template(BASE + macro).render(event, CTX, {}, url_encode=url_encode)
    assert url.startswith(BASE)
    return url.removeprefix(BASE)


def _unix(moment: datetime) -> str:
    return str(int(moment.timestamp()))


IOS_EXPECTED = [
    ("(idfa)", IDFA),
    ("(sha1-idfa)", _sha1(IDFA)),
    ("(idfv)", GAID),
    ("(advertiserId)", ""),
    ("(sha1-advertiserId)", ""),
    ("(android-id)", ""),
    ("(device-id)", IDFA),
    ("(app-id)", "id123456789"),
    ("(store-app-id)", "123456789"),
    ("(platform)", "ios"),
    ("(ip)", "203.0.113.7"),
    ("(install-unix-ts)", _unix(INSTALL_TIME_UTC)),
    ("(install-unix-ts)", "1714521599"),
    ("(timestamp)", _unix(EVENT_TIME_UTC)),
    ("(timestamp)", "1714557605"),
    ("(event-time)", "2024-05-01T10:00:05.000Z"),
    ("(install-time)", "2024-04-30T23:59:59.000Z"),
    ("(event-name)", "af_purchase"),
    ("(event)", "af_purchase"),
    ("(currency)", "EUR"),
    ("(event_revenue_currency)", "EUR"),
    ("(monetary)", "12.50"),
    ("(revenue)", "12.50"),
    ("(country_code)", "DE"),
    ("(pid)", "ads&co network"),
    ("(media_source)", "ads&co network"),
    ("(c)", "summer/sale?2024"),
    ("(campaign)", "summer/sale?2024"),
    ("(clickid)", "ck#1=2&3"),
    ("(click_id)", "ck#1=2&3"),
    ("(user-agent)", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X)"),
    ("(os-version)", "17.4.1"),
    ("(device-model)", "iPhone15,2"),
    ("(device_type)", "iPhone15,2"),
    ("(app-version-name)", "3.2.1 (beta)"),
    ("(language)", "de-DE"),
    ("(attributed_touch_type)", "1"),
    ("(touch_type)", "impression"),
    ("(delivery_id)", CTX.delivery_id),
    ("(attempt)", "1"),
]

ANDROID_EXPECTED = [
    ("(idfa)", ""),
    ("(sha1-idfa)", ""),
    ("(advertiserId)", GAID),
    ("(advertising_id)", GAID),
    ("(gaid)", GAID),
    ("(sha1-advertiserId)", _sha1(GAID)),
    ("(android-id)", ANDROID_ID),
    ("(sha1-android-id)", _sha1(ANDROID_ID)),
    ("(oaid)", "0123456789abcdef"),
    ("(device-id)", GAID),
    ("(app-id)", "com.example.game"),
    ("(store-app-id)", "com.example.game"),
    ("(platform)", "android"),
    ("(ip)", "2001:db8::1"),
    ("(install-unix-ts)", "1714521599"),
    ("(timestamp)", "1714557605"),
    ("(event-name)", "install"),
    ("(event-value)", ""),  # no event values: empty, not "{}"
    ("(currency)", ""),
    ("(monetary)", ""),
    ("(country_code)", "BR"),
    ("(pid)", "googleadwords_int"),
    ("(media_source)", "googleadwords_int"),
    ("(clickid)", "abc123"),
    ("(user-agent)", "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8)"),
    ("(os-version)", "14"),
    ("(device-model)", "Pixel 8"),
    ("(app-version-name)", "1.0.0"),
    ("(language)", "pt_BR"),
    ("(attributed_touch_type)", "0"),
    ("(delivery_id)", CTX.delivery_id),
]


def _ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{macro}={expected[:12]}" for macro, expected in cases]


@pytest.mark.parametrize(("macro", "expected"), IOS_EXPECTED, ids=_ids(IOS_EXPECTED))
def test_ios_macro_renders_encoded_value(macro: str, expected: str) -> None:
    raw = render_value(macro, IOS_EVENT)
    assert raw == quote(expected, safe="")
    assert unquote(raw) == expected


@pytest.mark.parametrize(("macro", "expected"), ANDROID_EXPECTED, ids=_ids(ANDROID_EXPECTED))
def test_android_macro_renders_encoded_value(macro: str, expected: str) -> None:
    raw = render_value(macro, ANDROID_EVENT)
    assert raw == quote(expected, safe="")
    assert unquote(raw) == expected


def test_sha1_macros_match_hashlib_of_the_stored_id() -> None:
    assert render_value("(sha1-idfa)", IOS_EVENT) == hashlib.sha1(IDFA.encode()).hexdigest()
    lower = IDFA.lower()
    event = IOS_EVENT.model_copy(update={"idfa": lower})
    assert render_value("(sha1-idfa)", event) == hashlib.sha1(lower.encode()).hexdigest()
    assert render_value("(sha1-advertiserId)", ANDROID_EVENT) == (
        hashlib.sha1(GAID.encode()).hexdigest()
    )
    assert len(render_value("(sha1-idfa)", IOS_EVENT)) == 40


def test_ipv6_is_percent_encoded() -> None:
    assert render_value("(ip)", ANDROID_EVENT) == "2001%3Adb8%3A%3A1"


def test_free_text_values_are_fully_percent_encoded() -> None:
    assert render_value("(pid)", IOS_EVENT) == "ads%26co%20network"
    assert render_value("(campaign)", IOS_EVENT) == "summer%2Fsale%3F2024"
    assert render_value("(clickid)", IOS_EVENT) == "ck%231%3D2%263"


@pytest.mark.parametrize("macro", ["(event-value)", "(encode)", "(event_value)", "(json)"])
def test_event_value_is_url_encoded_json_of_event_values(macro: str) -> None:
    raw = render_value(macro, IOS_EVENT)
    assert re.fullmatch(r"(?:[A-Za-z0-9_.~-]|%[0-9A-F]{2})+", raw), raw
    assert json.loads(unquote(raw)) == IOS_EVENT.event_values
    assert json.loads(unquote(raw)) == {
        "af_quantity": 1,
        "af_content_id": "1107",
        "note": "ü & ü=?#",
    }
    query = urlsplit(BASE + raw).query
    assert parse_qsl(query, keep_blank_values=True) == [("v", unquote(raw))]


def test_monetary_keeps_decimal_digits() -> None:
    assert render_value("(monetary)", IOS_EVENT) == "12.50"  # trailing zero kept
    event = ConversionEvent.model_validate(
        {**MINIMAL_EVENT.model_dump(exclude={"event_id"}), "revenue": "0.000001", "currency": "USD"}
    )
    assert render_value("(monetary)", event) == "0.000001"


@pytest.mark.parametrize(
    "name",
    [
        "idfa",
        "sha1-idfa",
        "advertiserId",
        "app-id",
        "ip",
        "install-unix-ts",
        "timestamp",
        "event-name",
        "encode",
        "currency",
        "monetary",
        "country_code",
        "pid",
        "media_source",
        "clickid",
        "user-agent",
        "os-version",
        "device-model",
        "app-version-name",
        "language",
        "attributed_touch_type",
        "delivery_id",
    ],
)
@pytest.mark.parametrize("event", [IOS_EVENT, ANDROID_EVENT], ids=["ios", "android"])
def test_brace_style_renders_like_parenthesis_style(name: str, event: ConversionEvent) -> None:
    assert render_value(f"{{{name}}}", event) == render_value(f"({name})", event)


@pytest.mark.parametrize(
    ("variant", "reference"),
    [
        ("(Event_Name)", "(event-name)"),
        ("(EVENT-NAME)", "(event-name)"),
        ("(event name)", "(event-name)"),
        ("(media source)", "(media_source)"),
        ("(Media-Source)", "(media_source)"),
        ("(PID)", "(pid)"),
        ("(ADVERTISERID)", "(advertiserId)"),
        ("(Advertising-ID)", "(advertiserId)"),
        ("(SHA1_IDFA)", "(sha1-idfa)"),
        ("(Install_Unix_Ts)", "(install-unix-ts)"),
        ("{App Id}", "(app-id)"),
        ("(Country-Code)", "(country_code)"),
    ],
)
@pytest.mark.parametrize("event", [IOS_EVENT, ANDROID_EVENT], ids=["ios", "android"])
def test_macro_names_are_case_and_separator_insensitive(
    variant: str, reference: str, event: ConversionEvent
) -> None:
    assert render_value(variant, event) == render_value(reference, event)


def test_case_insensitive_names_render_non_empty_values() -> None:
    assert render_value("(Event_Name)", IOS_EVENT) == "af_purchase"
    assert render_value("(media source)", IOS_EVENT) == "ads%26co%20network"
    assert render_value("(ADVERTISERID)", ANDROID_EVENT) == GAID


@pytest.mark.parametrize(
    "macro",
    [
        "(idfa)",
        "(sha1-idfa)",
        "(advertiserId)",
        "(sha1-advertiserId)",
        "(android-id)",
        "(ip)",
        "(install-unix-ts)",
        "(install-time)",
        "(event-value)",
        "(encode)",
        "(currency)",
        "(monetary)",
        "(country_code)",
        "(pid)",
        "(campaign)",
        "(clickid)",
        "(user-agent)",
        "(os-version)",
        "(device-model)",
        "(app-version-name)",
        "(language)",
        "(attributed_touch_type)",
        "(touch_type)",
        "(attributed_touch_time)",
        "(event_revenue_usd)",
        "(device-id)",
    ],
)
def test_absent_values_render_as_empty_strings(macro: str) -> None:
    url = compile_url_template(f"https://partner.example/pb?a=1&v={macro}&z=2").render(
        MINIMAL_EVENT, CTX, {}, url_encode=True
    )
    assert url == "https://partner.example/pb?a=1&v=&z=2"
    assert "None" not in url


def test_whole_template_renders_in_place() -> None:
    template = compile_url_template(
        "https://partner.example/pb/(app-id)?pid=(media_source)&advertising_id=(advertiserId)"
        "&android_id=(android-id)&install_time=(install-unix-ts)&event_name=(event-name)"
        "&currency=(currency)&json=(event-value)#x"
    )
    url = template.render(ANDROID_EVENT, CTX, {}, url_encode=True)
    assert url == (
        "https://partner.example/pb/com.example.game?pid=googleadwords_int"
        f"&advertising_id={GAID}&android_id={ANDROID_ID}&install_time=1714521599"
        "&event_name=install&currency=&json=#x"
    )


def test_render_without_url_encoding_gives_raw_values() -> None:
    assert render_value("(campaign)", IOS_EVENT, url_encode=False) == "summer/sale?2024"
    assert json.loads(render_value("(encode)", IOS_EVENT, url_encode=False)) == (
        IOS_EVENT.event_values
    )


def test_compile_template_for_bodies_allows_any_text() -> None:
    template = compile_template('{"idfa": "(idfa)", "n": "{event_name}"}')
    body = template.render(IOS_EVENT, CTX, {}, url_encode=False)
    assert body == f'{{"idfa": "{IDFA}", "n": "af_purchase"}}'
    assert template.uses_event is True
    assert compile_template("static").uses_event is False


def test_every_table_macro_compiles_in_both_styles() -> None:
    assert len(MACROS) > 40
    for name in MACROS:
        for written in (f"({name})", f"{{{name}}}"):
            template = compile_url_template(BASE + written)
            assert template.uses_event
            assert canonical(name) == name


# --------------------------------------------------------------------------- credentials

CRED_TEMPLATE = "https://partner.example/pb?token={credential:token}&idfa=(idfa)"


def test_credential_renders_the_secret_url_encoded() -> None:
    template = compile_url_template(CRED_TEMPLATE, frozenset({"token", "other"}))
    assert template.credentials == frozenset({"token"})
    url = template.render(IOS_EVENT, CTX, {"token": "s3cr/t&x=1"}, url_encode=True)
    assert url == f"https://partner.example/pb?token=s3cr%2Ft%26x%3D1&idfa={IDFA}"
    assert dict(parse_qsl(urlsplit(url).query))["token"] == "s3cr/t&x=1"


def test_credential_in_parenthesis_style() -> None:
    template = compile_url_template(
        "https://partner.example/pb?k=(credential:api_key)", frozenset({"api_key"})
    )
    assert template.render(IOS_EVENT, CTX, {"api_key": "K1"}, url_encode=True) == (
        "https://partner.example/pb?k=K1"
    )


def test_credential_is_masked_when_asked() -> None:
    template = compile_url_template(CRED_TEMPLATE, frozenset({"token"}))
    url = template.render(IOS_EVENT, CTX, {"token": "s3cr/t"}, url_encode=True, mask_secrets=True)
    assert url == f"https://partner.example/pb?token=***&idfa={IDFA}"
    assert "s3cr" not in url


def test_undeclared_credential_is_a_template_error_naming_it() -> None:
    with pytest.raises(TemplateError, match=r"credential 'token'.*not declared") as info:
        compile_url_template(CRED_TEMPLATE)
    assert "{credential:token}" in str(info.value)
    assert "none declared" in str(info.value)


def test_undeclared_credential_lists_the_declared_ones() -> None:
    with pytest.raises(TemplateError, match="credential 'token'") as info:
        compile_url_template(CRED_TEMPLATE, frozenset({"api_key", "secret"}))
    assert "api_key, secret" in str(info.value)


# --------------------------------------------------------------------------- template errors


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("https://partner.example/pb?x=(nope)", r"unknown macro \(nope\)"),
        ("https://partner.example/pb?x={not_a_macro}", r"unknown macro \{not_a_macro\}"),
        ("https://(idfa).example/pb", "literal host before any macro"),
        ("https://{credential:t}.example/pb", "literal host before any macro"),
        ("https://(idfa)@a.example/pb", "literal host before any macro"),
        ("https://a.example(idfa)", "may not touch the host"),
        ("https://a.example(idfa)/pb", "may not touch the host"),
        ("https://a.example:(idfa)/pb", "may not touch the host"),
        ("https://a.example:80(idfa)", "may not touch the host"),
        ("ftp://a.example/(idfa)", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("//a.example/(idfa)", "http:// or https://"),
        ("(idfa)://a.example/", "http:// or https://"),
        ("a.example/(idfa)", "http:// or https://"),
        ("https://a.example/a b?x=(idfa)", "whitespace"),
        ("https://a.example/pb?x=(idfa) ", "whitespace"),
        ("https://a.example/pb?x=(idfa)\n", "whitespace"),
        ("https://a.example/pb?x=(idfa)&\r\ny=1", "whitespace"),
        ("https://a.example/pb\t?x=1", "whitespace"),
    ],
)
def test_bad_template_raises_template_error_naming_the_rule(text: str, rule: str) -> None:
    with pytest.raises(TemplateError, match=rule):
        compile_url_template(text, frozenset({"t"}))


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "https://a.example/(idfa)",
        "https://a.example?x=(idfa)",
        "https://a.example#(idfa)",
        "http://a.example:8080/p/(event-name)",
        "https://a.example/pb",
        "https://a.example/pb?x=(media source)",
    ],
)
def test_good_templates_compile(text: str) -> None:
    template = compile_url_template(text)
    assert template.source == text
    rendered = template.render(IOS_EVENT, CTX, {}, url_encode=True)
    assert urlsplit(rendered).netloc == urlsplit(text).netloc


# --------------------------------------------------------------------------- properties

PROPERTY_TEMPLATE = (
    "https://partner.example/pb/(app-id)?c=(campaign)&pid=(pid)&ua=(user-agent)"
    "&e=(event-name)&json=(encode)&click=(clickid)#frag"
)
URL_HOSTILE = "/?#&=%+;:@ \t\r\n\x00()[]{}\"'<>\\é€😀\u2028\x85"


def hostile_text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Any text, with URL delimiters, CR/LF and non-ASCII drawn often."""
    return st.text(
        alphabet=st.one_of(st.sampled_from(URL_HOSTILE), st.characters(codec="utf-8")),
        min_size=min_size,
        max_size=max_size,
    )


json_leaf = st.one_of(
    hostile_text(30),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(hostile_text(10), inner, max_size=3)
    ),
    max_leaves=8,
)

app_ids = st.one_of(
    st.tuples(st.just("ios"), st.from_regex(r"(id)?[0-9]{1,12}", fullmatch=True)),
    st.tuples(
        st.just("android"),
        st.from_regex(
            r"[A-Za-z][A-Za-z0-9_]{0,8}(\.[A-Za-z][A-Za-z0-9_]{0,8}){1,3}", fullmatch=True
        ),
    ),
)


@st.composite
def hostile_events(draw: st.DrawFn) -> ConversionEvent:
    platform, app_id = draw(app_ids)
    data: dict[str, Any] = {
        "app_id": app_id,
        "platform": platform,
        # required and not blank-able: the stripped name must keep at least one character
        "event_name": draw(hostile_text(100, min_size=1).filter(lambda s: s.strip())),
        "event_time": "2024-05-01T12:00:00+02:00",
        "campaign": draw(hostile_text(256)),
        "media_source": draw(hostile_text(100)),
        "user_agent": draw(hostile_text(1024)),
        "click_id": draw(hostile_text(512)),
        "event_values": draw(st.dictionaries(hostile_text(20), json_values, max_size=5)),
    }
    return ConversionEvent.model_validate(data)


PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis directory in the repository
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(event=hostile_events())
def test_property_values_cannot_change_url_structure(event: ConversionEvent) -> None:
    url = compile_url_template(PROPERTY_TEMPLATE).render(event, CTX, {}, url_encode=True)
    parts = urlsplit(url)
    template_parts = urlsplit(PROPERTY_TEMPLATE)

    assert parts.scheme == template_parts.scheme == "https"
    assert parts.netloc == template_parts.netloc == "partner.example"
    assert parts.path == "/pb/" + event.app_id
    assert len(parts.path.split("/")) == len(template_parts.path.split("/"))
    assert parts.fragment == template_parts.fragment == "frag"
    assert not any(c in url for c in " \t\r\n")

    pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    template_names = [n for n, _ in parse_qsl(template_parts.query, keep_blank_values=True)]
    assert [n for n, _ in pairs] == template_names == ["c", "pid", "ua", "e", "json", "click"]

    values = dict(pairs)
    assert values["c"] == (event.campaign or "")
    assert values["pid"] == (event.media_source or "")
    assert values["ua"] == (event.user_agent or "")
    assert values["e"] == event.event_name
    assert values["click"] == (event.click_id or "")
    if event.event_values:
        assert json.loads(values["json"]) == event.event_values
    else:
        assert values["json"] == ""


@PROPERTY_SETTINGS
@given(event=hostile_events())
def test_property_values_in_path_stay_one_segment_each(event: ConversionEvent) -> None:
    template = "https://partner.example/pb/(campaign)/(pid)/(event-name)/end?x=(clickid)#f"
    url = compile_url_template(template).render(event, CTX, {}, url_encode=True)
    parts = urlsplit(url)
    assert parts.netloc == "partner.example"
    assert parts.fragment == "f"
    segments = parts.path.split("/")
    assert len(segments) == len(urlsplit(template).path.split("/")) == 6
    assert segments[0] == ""
    assert segments[1] == "pb"
    assert segments[5] == "end"
    assert unquote(segments[2]) == (event.campaign or "")
    assert unquote(segments[3]) == (event.media_source or "")
    assert unquote(segments[4]) == event.event_name
    assert parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True) == [
        ("x", event.click_id or "")
    ]


# Unreserved characters or %XX only. "*" is also accepted: Template.render leaves a value equal
# to the mask "***" unencoded (harmless: '*' is legal in paths and queries and decodes to itself).
_ENCODED = re.compile(r"(?:[A-Za-z0-9_.~*-]|%[0-9A-F]{2})*")


@PROPERTY_SETTINGS
@given(event=hostile_events())
def test_property_each_encoded_value_uses_only_unreserved_characters(
    event: ConversionEvent,
) -> None:
    for macro, value in [
        ("(campaign)", event.campaign),
        ("(media_source)", event.media_source),
        ("(user-agent)", event.user_agent),
        ("(event-name)", event.event_name),
        ("(clickid)", event.click_id),
    ]:
        raw = render_value(macro, event)
        assert _ENCODED.fullmatch(raw), (macro, raw)
        assert unquote(raw, errors="strict") == (value or "")
        assert render_value(macro, event, url_encode=False) == (value or "")


@PROPERTY_SETTINGS
@given(idfa=st.uuids().map(str), upper=st.booleans(), gaid=st.uuids().map(str))
def test_property_sha1_macros_match_hashlib(idfa: str, upper: bool, gaid: str) -> None:
    idfa = idfa.upper() if upper else idfa
    ios = IOS_EVENT.model_copy(update={"idfa": idfa})
    android = ANDROID_EVENT.model_copy(update={"gaid": gaid})
    assert render_value("(sha1-idfa)", ios) == _sha1(idfa)
    assert render_value("(idfa)", ios) == idfa
    assert render_value("(sha1-advertiserId)", android) == _sha1(gaid)
    assert render_value("(advertiserId)", android) == gaid


# --- regressions -------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\xa0", "\x85", "\u2028", "\x00"])
def test_any_whitespace_or_control_character_in_the_literal_url_is_refused(char: str) -> None:
    with pytest.raises(TemplateError, match="whitespace or control characters"):
        compile_url_template(f"https://a.example/x{char}y?i=(idfa)")


def test_only_a_masked_credential_skips_encoding() -> None:
    """An event value that happens to be '***' is encoded like any other value."""
    event = IOS_EVENT.model_copy(update={"campaign": "***"})
    template = compile_url_template(
        "https://a.example/?c=(campaign)&k={credential:key}", frozenset({"key"})
    )
    masked = template.render(
        event, CTX, {"key": "secret-value"}, url_encode=True, mask_secrets=True
    )
    assert masked == "https://a.example/?c=%2A%2A%2A&k=***"


# --------------------------------------------------------------------------- dot segments


@pytest.mark.parametrize(
    ("template", "campaign", "media_source", "path"),
    [
        ("/pb/tpl/(c)/end", "..", None, "/pb/tpl/%2E%2E/end"),
        ("/pb/tpl/(c)/end", ".", None, "/pb/tpl/%2E/end"),
        ("/pb/tpl/(c)/end", "...", None, "/pb/tpl/.../end"),  # not a dot segment
        ("/pb/tpl/(c)/end", "a..b", None, "/pb/tpl/a..b/end"),
        ("/pb/tpl/(c)(pid)/end", ".", ".", "/pb/tpl/%2E%2E/end"),  # two macros make ".."
        ("/pb/tpl/.(c)/end", ".", None, "/pb/tpl/%2E%2E/end"),  # a literal dot and a value
        ("/pb/tpl/.(c)/end", None, None, "/pb/tpl/%2E/end"),  # an empty value next to "."
        ("/pb/tpl/(c)", "..", None, "/pb/tpl/%2E%2E"),  # the last segment too
        ("/pb/tpl/(c)?c=(c)", "..", None, "/pb/tpl/%2E%2E"),  # the query is not a path
    ],
)
def test_a_value_that_makes_a_dot_segment_has_its_dots_encoded(
    template: str, campaign: str | None, media_source: str | None, path: str
) -> None:
    event = MINIMAL_EVENT.model_copy(update={"campaign": campaign, "media_source": media_source})
    url = compile_url_template("https://partner.example" + template).render(
        event, CTX, {}, url_encode=True
    )
    assert urlsplit(url).path == path
    if "?" in template:
        assert urlsplit(url).query == "c=.."


def test_a_literal_dot_segment_of_the_template_is_left_as_written() -> None:
    """Only segments a macro takes part in are the event's; the rest is the partner's URL."""
    url = compile_url_template("https://partner.example/pb/../x/./(c)").render(
        MINIMAL_EVENT.model_copy(update={"campaign": "v"}), CTX, {}, url_encode=True
    )
    assert url == "https://partner.example/pb/../x/./v"


# --------------------------------------------------------------------------- on the wire


@dataclass
class WireDelivery:
    """A templated destination at a real local server, delivered by a worker's own pipeline."""

    receiver: PostbackReceiver
    runtime: WorkerRuntime
    producer: Producer

    def deliver(self, **values: Any) -> tuple[ReceivedRequest, str]:
        """Send one event; what the server received and the URL the attempt log keeps."""
        event = ConversionEvent.model_validate(
            {
                "app_id": "123456789",
                "platform": "ios",
                "event_name": "purchase",
                "event_time": datetime.now(UTC).isoformat(),
                "event_id": str(uuid.uuid4()),
                **values,
            }
        )
        dest = self.runtime.destinations.get("tpl")
        route = dest.route_for(event)
        assert route is not None
        envelope = self.producer.envelope_for(event, dest, route, datetime.now(UTC))
        self.receiver.requests.clear()
        result = self.runtime.pipeline.run(envelope)
        assert result.status == "delivered", result
        (received,) = self.receiver.requests
        *_, record = self.runtime.pipeline.attempts.iter_records()
        assert record["delivery_id"] == envelope.delivery_id
        return received, record["postback_url"]


WIRE_TEMPLATE = "/pb/tpl/(c)/mid/(pid)(event-name)/.(clickid)/end?c=(c)"


@pytest.fixture
def wire(
    receiver: PostbackReceiver,
    redis_client: redis.Redis,
    write_destinations: Callable[[str], Path],
    make_producer: Callable[[Path], Producer],
    make_runtime: Callable[[Path], WorkerRuntime],
) -> WireDelivery:
    path = write_destinations(f"""
[[destination]]
name = "tpl"
kind = "templated"
url = "{receiver.url}{WIRE_TEMPLATE}"
[[destination.routes]]
type = "event"
""")
    return WireDelivery(receiver, make_runtime(path), make_producer(path))


@pytest.mark.parametrize(
    ("campaign", "sent"),
    [
        (".", "%2E"),
        ("..", "%2E%2E"),
        ("%2e%2E", "%252e%252E"),  # already encoded: sent as the text it is, never decoded
        ("/", "%2F"),
        ("?", "%3F"),
        ("#", "%23"),
        (None, ""),  # empty: an empty segment, still the macro's own
    ],
)
def test_a_path_value_reaches_the_partner_as_one_segment_of_data(
    wire: WireDelivery, campaign: str | None, sent: str
) -> None:
    received, recorded = wire.deliver(campaign=campaign, media_source="m", click_id="k")
    assert received.path == f"/pb/tpl/{sent}/mid/mpurchase/.k/end"
    assert f"{wire.receiver.url}{received.raw_target}" == recorded


def test_adjacent_values_cannot_make_a_dot_segment_together(wire: WireDelivery) -> None:
    received, recorded = wire.deliver(campaign="c", media_source=".", event_name=".", click_id=".")
    assert received.path == "/pb/tpl/c/mid/%2E%2E/%2E%2E/end"
    assert f"{wire.receiver.url}{received.raw_target}" == recorded


DOTTY = [".", "..", "%2e", "%2E%2e", ".%2E", "%2e.", "...", "", "/", "?", "#", "%", "/../"]


def path_value(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(DOTTY[min_size:]), hostile_text(max_size, min_size))


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    # One server and one Redis serve every example; each example reads only its own request.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    campaign=path_value(256),
    media_source=path_value(100),
    event_name=path_value(100, min_size=1).filter(lambda s: s.strip()),
    click_id=path_value(512),
)
def test_property_the_partner_receives_the_template_path_and_the_logged_url(
    wire: WireDelivery, campaign: str, media_source: str, event_name: str, click_id: str
) -> None:
    received, recorded = wire.deliver(
        campaign=campaign, media_source=media_source, event_name=event_name, click_id=click_id
    )
    event_values = ConversionEvent.model_validate(  # as the event model keeps them (stripped)
        {**MINIMAL_EVENT.model_dump(exclude={"event_id"}), "campaign": campaign,
         "media_source": media_source, "event_name": event_name, "click_id": click_id}
    )  # fmt: skip
    segments = received.path.split("/")
    assert segments[:3] == ["", "pb", "tpl"]
    assert segments[4] == "mid"
    assert segments[7] == "end"
    assert len(segments) == 8
    assert unquote(segments[3], errors="strict") == (event_values.campaign or "")
    assert unquote(segments[5], errors="strict") == (
        (event_values.media_source or "") + event_values.event_name
    )
    assert unquote(segments[6], errors="strict") == "." + (event_values.click_id or "")
    assert received.query == [("c", event_values.campaign or "")]
    assert f"{wire.receiver.url}{received.raw_target}" == recorded
