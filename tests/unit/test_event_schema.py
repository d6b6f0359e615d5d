"""ConversionEvent.parse: normalisation, one error message per broken rule, content ids;
and the DeliveryEnvelope that carries an event on a destination queue."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pycountry
import pytest

from schemas.envelope import (
    AttemptSummary,
    DeliveryEnvelope,
    PoisonMessage,
    delivery_id_for,
)
from schemas.errors import InvalidEvent
from schemas.event import ConversionEvent

IDFA = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"


def ios(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "app_id": "123456789",
        "platform": "ios",
        "event_name": "install",
        "event_time": "2024-05-01T12:00:00+02:00",
    }
    data.update(overrides)
    return data


def android(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "app_id": "com.example.game",
        "platform": "android",
        "event_name": "install",
        "event_time": "2024-05-01T12:00:00+02:00",
    }
    data.update(overrides)
    return data


# --------------------------------------------------------------------------- normalisation


def test_event_time_with_offset_is_converted_to_utc() -> None:
    event = ConversionEvent.parse(ios(event_time="2024-05-01T12:00:00+02:00"))
    assert event.event_time == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert event.event_time.utcoffset() == timedelta(0)


def test_install_time_with_negative_offset_is_converted_to_utc() -> None:
    event = ConversionEvent.parse(ios(install_time="2024-04-30T22:30:15.250000-05:00"))
    assert event.install_time == datetime(2024, 5, 1, 3, 30, 15, 250000, tzinfo=UTC)
    assert event.install_time is not None
    assert event.install_time.utcoffset() == timedelta(0)


def test_datetime_objects_with_offset_are_converted_to_utc() -> None:
    tz = datetime.fromisoformat("2024-01-01T00:00:00+05:30").tzinfo
    event = ConversionEvent.parse(ios(event_time=datetime(2024, 5, 1, 12, 0, tzinfo=tz)))
    assert event.event_time == datetime(2024, 5, 1, 6, 30, tzinfo=UTC)
    assert event.event_time.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("given", "stored"),
    [("123456789", "id123456789"), ("id123", "id123"), (" 42 ", "id42")],
)
def test_ios_app_id_is_normalised_to_id_prefix(given: str, stored: str) -> None:
    assert ConversionEvent.parse(ios(app_id=given)).app_id == stored


def test_android_app_id_is_kept() -> None:
    assert ConversionEvent.parse(android(app_id="com.Example.game_2")).app_id == (
        "com.Example.game_2"
    )


@pytest.mark.parametrize("given", ["iOS", "IOS", " ios "])
def test_platform_is_lower_cased(given: str) -> None:
    assert ConversionEvent.parse(ios(platform=given)).platform == "ios"


def test_android_platform_is_lower_cased() -> None:
    assert ConversionEvent.parse(android(platform="Android")).platform == "android"


def test_country_and_currency_are_upper_cased() -> None:
    event = ConversionEvent.parse(ios(country="de", currency="usd"))
    assert event.country == "DE"
    assert event.currency == "USD"


@pytest.mark.parametrize(
    "field",
    [
        "install_time",
        "idfa",
        "idfv",
        "ip",
        "user_agent",
        "country",
        "language",
        "os_version",
        "device_model",
        "app_version",
        "media_source",
        "campaign",
        "campaign_id",
        "adset_id",
        "ad_id",
        "site_id",
        "click_id",
        "touch_type",
        "touch_time",
        "revenue",
        "currency",
        "revenue_usd",
    ],
)
@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_blank_optional_strings_become_none(field: str, blank: str) -> None:
    event = ConversionEvent.parse(ios(**{field: blank}))
    assert getattr(event, field) is None


@pytest.mark.parametrize("field", ["gaid", "android_id", "oaid"])
def test_blank_android_ids_become_none(field: str) -> None:
    event = ConversionEvent.parse(android(**{field: ""}))
    assert getattr(event, field) is None


def test_free_text_is_stripped() -> None:
    event = ConversionEvent.parse(ios(campaign="  summer sale \n", event_name=" purchase "))
    assert event.campaign == "summer sale"
    assert event.event_name == "purchase"


@pytest.mark.parametrize(
    "value",
    [Decimal("0.1"), Decimal("1.50"), Decimal("123456789.123456"), Decimal("0.000001")],
)
def test_revenue_decimal_keeps_its_value_exactly(value: Decimal) -> None:
    event = ConversionEvent.parse(ios(revenue=value, currency="EUR", revenue_usd=value))
    assert event.revenue == value
    assert str(event.revenue) == str(value)
    assert isinstance(event.revenue, Decimal)
    assert event.revenue_usd == value
    # JSON form keeps the digits too (no float round trip)
    assert event.model_dump(mode="json")["revenue"] == format(value, "f")


def test_revenue_string_is_parsed_exactly() -> None:
    event = ConversionEvent.parse(ios(revenue="19.99", currency="USD"))
    assert event.revenue == Decimal("19.99")


def test_valid_ids_are_accepted_and_case_kept() -> None:
    lower = IDFA.lower()
    event = ConversionEvent.parse(ios(idfa=lower, idfv=IDFA))
    assert event.idfa == lower
    assert event.idfv == IDFA
    event = ConversionEvent.parse(
        android(gaid=GAID, android_id="9aaeecc4455abcde", oaid="0123456789abcdef")
    )
    assert (event.gaid, event.android_id, event.oaid) == (
        GAID,
        "9aaeecc4455abcde",
        "0123456789abcdef",
    )


def test_parse_passes_a_model_through() -> None:
    event = ConversionEvent.parse(ios())
    assert ConversionEvent.parse(event) is event


def test_event_is_frozen() -> None:
    event = ConversionEvent.parse(ios())
    with pytest.raises(ValueError, match="frozen"):
        event.campaign = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- rule failures


def _not_iso4217(code: str) -> str:
    assert pycountry.currencies.get(alpha_3=code) is None, code
    return code


BAD_EVENTS = [
    pytest.param(ios(event_time="2024-05-01T12:00:00"), "event_time", "timezone", id="naive"),
    pytest.param(ios(install_time="2024-05-01T12:00:00"), "install_time", "timezone", id="naive2"),
    pytest.param(ios(idfa="not-a-uuid"), "idfa", "must be a UUID", id="idfa"),
    pytest.param(
        ios(idfa=IDFA.replace("-", "")), "idfa", "36-character hyphenated", id="idfa-unhyphenated"
    ),
    pytest.param(android(gaid="xyz"), "gaid", "must be a UUID", id="gaid"),
    pytest.param(android(android_id="zz"), "android_id", "hexadecimal", id="android_id"),
    pytest.param(android(oaid="0123"), "oaid", "UUID", id="oaid"),
    pytest.param(ios(country="ZZ"), "country", "ISO 3166-1 alpha-2", id="country"),
    pytest.param(ios(country="DEU"), "country", "ISO 3166-1 alpha-2", id="country-alpha3"),
    pytest.param(ios(currency=_not_iso4217("ABC")), "currency", "ISO 4217", id="currency"),
    pytest.param(ios(currency="US"), "currency", "ISO 4217", id="currency-short"),
    pytest.param(
        ios(revenue="1.1234567", currency="USD"), "revenue", "6 decimal places", id="revenue-7dp"
    ),
    pytest.param(
        ios(revenue="Infinity", currency="USD"), "revenue", "finite", id="revenue-infinite"
    ),
    pytest.param(ios(revenue="1.5"), "currency", "required when revenue is set", id="no-currency"),
    pytest.param(ios(foo=1), "foo", "Extra inputs are not permitted", id="extra-field"),
    pytest.param(ios(event_id="x" * 129), "event_id", "at most 128 characters", id="long-id"),
    pytest.param(ios(event_id="a b"), "event_id", "pattern", id="id-with-space"),
    pytest.param(android(app_id="game"), "app_id", "package name", id="android-app-id"),
    pytest.param(android(app_id="com.1example"), "app_id", "package name", id="android-digit"),
    pytest.param(ios(app_id="com.example.game"), "app_id", "App Store id", id="ios-app-id"),
    pytest.param(ios(app_id="id12a"), "app_id", "App Store id", id="ios-app-id-alnum"),
    pytest.param(android(idfa=IDFA), "idfa", "not allowed on an android event", id="idfa-android"),
    pytest.param(android(idfv=IDFA), "idfv", "not allowed on an android event", id="idfv-android"),
    pytest.param(ios(gaid=GAID), "gaid", "not allowed on an ios event", id="gaid-ios"),
    pytest.param(
        ios(android_id="abcdef"), "android_id", "not allowed on an ios event", id="android_id-ios"
    ),
    pytest.param(
        ios(event_values={"a": object()}), "event_values", "must be a JSON object", id="ev-object"
    ),
    pytest.param(
        ios(event_values={"a": float("nan")}), "event_values", "must be a JSON object", id="ev-nan"
    ),
    pytest.param(
        ios(event_values={"a": "x" * 20_000}), "event_values", "at most 16384 bytes", id="ev-big"
    ),
    pytest.param(ios(event_values=["a"]), "event_values", "dictionary", id="ev-list"),
    pytest.param(ios(ip="999.1.1.1"), "ip", "not a valid IPv4 or IPv6", id="ip"),
    pytest.param(ios(ip="example.com"), "ip", "not a valid IPv4 or IPv6", id="ip-name"),
    pytest.param(ios(touch_type="view"), "touch_type", "'click' or 'impression'", id="touch"),
    pytest.param(ios(platform="web"), "platform", "'ios' or 'android'", id="platform"),
    pytest.param(ios(language="e"), "language", "pattern", id="language"),
    pytest.param(ios(event_name=""), "event_name", "at least 1 character", id="empty-name"),
    pytest.param(ios(event_name="e" * 101), "event_name", "at most 100", id="long-name"),
    pytest.param(ios(campaign="c" * 257), "campaign", "at most 256", id="long-campaign"),
    pytest.param({"platform": "ios"}, "event_time", "Field required", id="missing"),
]


@pytest.mark.parametrize(("data", "field", "rule"), BAD_EVENTS)
def test_rule_failure_names_field_and_rule(data: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        ConversionEvent.parse(data)
    message = str(info.value)
    assert message.startswith("invalid event: ")
    assert field in message
    assert rule in message
    # the field and its rule are in the same part of the message
    assert any(field in part and rule in part for part in info.value.errors), info.value.errors


def test_invalid_event_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="country"):
        ConversionEvent.parse(ios(country="ZZ"))


def test_long_values_are_not_echoed_in_full() -> None:
    with pytest.raises(InvalidEvent) as info:
        ConversionEvent.parse(ios(event_id="y" * 500))
    assert "y" * 100 not in str(info.value)
    assert "..." in str(info.value)


@pytest.mark.parametrize(
    ("data", "type_name"),
    [(None, "NoneType"), ([], "list"), ("install", "str"), (42, "int"), (b"{}", "bytes")],
)
def test_non_dict_input_is_rejected(data: Any, type_name: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        ConversionEvent.parse(data)
    assert "expected a dict" in str(info.value)
    assert type_name in str(info.value)


def test_several_errors_are_all_reported_in_one_message() -> None:
    with pytest.raises(InvalidEvent) as info:
        ConversionEvent.parse(
            ios(country="ZZ", currency="ABC", ip="bad", idfa="nope", touch_type="view")
        )
    message = str(info.value)
    for field, rule in [
        ("country", "ISO 3166-1"),
        ("currency", "ISO 4217"),
        ("ip", "IPv4 or IPv6"),
        ("idfa", "UUID"),
        ("touch_type", "'click' or 'impression'"),
    ]:
        assert any(field in part and rule in part for part in info.value.errors), field
        assert rule in message
    assert len(info.value.errors) == 5
    assert message.count("; ") == 4


def test_missing_required_fields_are_all_named() -> None:
    with pytest.raises(InvalidEvent) as info:
        ConversionEvent.parse({"platform": "ios"})
    assert [p.split(":")[0] for p in info.value.errors] == ["app_id", "event_name", "event_time"]


# --------------------------------------------------------------------------- event_id


def test_absent_event_id_is_derived_from_content() -> None:
    event = ConversionEvent.parse(ios())
    assert event.event_id is not None
    assert event.event_id.startswith("sha256:")
    assert len(event.event_id) <= 128
    int(event.event_id.removeprefix("sha256:"), 16)  # hex digest


def test_derived_event_id_is_deterministic() -> None:
    data = ios(idfa=IDFA, revenue="1.5", currency="USD", event_values={"b": 2, "a": [1, "x"]})
    first = ConversionEvent.parse(data)
    second = ConversionEvent.parse(dict(data))
    assert first.event_id == second.event_id
    assert first == second


def test_derived_event_id_ignores_key_order_of_event_values() -> None:
    a = ConversionEvent.parse(ios(event_values={"a": 1, "b": 2}))
    b = ConversionEvent.parse(ios(event_values={"b": 2, "a": 1}))
    assert a.event_id == b.event_id


@pytest.mark.parametrize(
    "equivalent",
    [
        {"event_time": "2024-05-01T10:00:00Z"},  # same instant, other offset
        {"app_id": "id123456789"},  # same app, normalised form
        {"platform": "IOS"},
        {"campaign": ""},  # blank is absent
        {"country": None},
    ],
)
def test_equal_content_after_normalisation_gives_equal_id(equivalent: dict[str, Any]) -> None:
    assert (
        ConversionEvent.parse(ios(**equivalent)).event_id == ConversionEvent.parse(ios()).event_id
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"event_name": "purchase"},
        {"event_time": "2024-05-01T12:00:01+02:00"},
        {"app_id": "123456780"},
        {"idfa": IDFA},
        {"ip": "203.0.113.7"},
        {"campaign": "x"},
        {"click_id": "c1"},
        {"revenue": "1", "currency": "USD"},
        {"event_values": {"a": 1}},
        {"install_time": "2024-05-01T00:00:00Z"},
        {"touch_type": "click"},
    ],
)
def test_derived_event_id_differs_when_any_field_differs(changed: dict[str, Any]) -> None:
    assert ConversionEvent.parse(ios(**changed)).event_id != ConversionEvent.parse(ios()).event_id


def test_derived_event_id_differs_between_platforms() -> None:
    assert ConversionEvent.parse(ios()).event_id != ConversionEvent.parse(android()).event_id


@pytest.mark.parametrize("given", ["evt-1", "x" * 128, "sha256:abc", "!~"])
def test_given_event_id_is_kept(given: str) -> None:
    assert ConversionEvent.parse(ios(event_id=given)).event_id == given


def test_given_event_id_does_not_depend_on_content() -> None:
    a = ConversionEvent.parse(ios(event_id="evt-1"))
    b = ConversionEvent.parse(ios(event_id="evt-1", event_name="purchase"))
    assert a.event_id == b.event_id == "evt-1"


# --------------------------------------------------------------------------- properties


def test_is_install() -> None:
    assert ConversionEvent.parse(ios(event_name="install")).is_install is True
    assert ConversionEvent.parse(ios(event_name="purchase")).is_install is False
    assert ConversionEvent.parse(ios(event_name="Install")).is_install is False


def test_store_app_id() -> None:
    assert ConversionEvent.parse(ios(app_id="id123456789")).store_app_id == "123456789"
    assert ConversionEvent.parse(ios(app_id="987")).store_app_id == "987"
    assert ConversionEvent.parse(android()).store_app_id == "com.example.game"


def test_store_app_id_keeps_android_package_starting_with_id() -> None:
    event = ConversionEvent.parse(android(app_id="idle.games.app"))
    assert event.store_app_id == "idle.games.app"


def test_advertising_id() -> None:
    assert ConversionEvent.parse(ios(idfa=IDFA, idfv=GAID)).advertising_id == IDFA
    assert ConversionEvent.parse(android(gaid=GAID)).advertising_id == GAID
    assert ConversionEvent.parse(ios(idfv=IDFA)).advertising_id is None
    assert ConversionEvent.parse(android(android_id="abc")).advertising_id is None


# --------------------------------------------------------------------------- DeliveryEnvelope

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_envelope(**overrides: Any) -> DeliveryEnvelope:
    event = ConversionEvent.parse(
        ios(event_name="purchase", idfa=IDFA, ip="203.0.113.77", revenue="9.99", currency="USD")
    )
    assert event.event_id is not None
    fields: dict[str, Any] = {
        "delivery_id": delivery_id_for(event.event_id, "partner-a"),
        "destination": "partner-a",
        "kind": "http",
        "event": event,
        "max_attempts": 5,
        "created_at": NOW,
    }
    fields.update(overrides)
    return DeliveryEnvelope(**fields)


def test_envelope_round_trips_through_task_arg() -> None:
    envelope = make_envelope()
    arg = envelope.to_task_arg()
    assert isinstance(arg["event"], dict)
    assert DeliveryEnvelope.from_task_arg(arg) == envelope


@pytest.mark.parametrize(
    ("garbage", "type_name"),
    [(None, "NoneType"), ("{}", "str"), ([1, 2], "list"), (7, "int")],
)
def test_from_task_arg_on_non_dict_is_poison(garbage: Any, type_name: str) -> None:
    with pytest.raises(PoisonMessage) as info:
        DeliveryEnvelope.from_task_arg(garbage)
    assert "expected a JSON object" in str(info.value)
    assert type_name in str(info.value)


@pytest.mark.parametrize(
    "missing", ["delivery_id", "destination", "kind", "max_attempts", "created_at"]
)
def test_from_task_arg_missing_field_is_poison(missing: str) -> None:
    arg = make_envelope().to_task_arg()
    del arg[missing]
    with pytest.raises(PoisonMessage) as info:
        DeliveryEnvelope.from_task_arg(arg)
    assert f"{missing}: Field required" in str(info.value)


def test_from_task_arg_without_event_or_redelivery_is_poison() -> None:
    arg = make_envelope().to_task_arg()
    del arg["event"]
    with pytest.raises(PoisonMessage) as info:
        DeliveryEnvelope.from_task_arg(arg)
    assert "event/redelivery: exactly one of the two must be given" in str(info.value)


def test_from_task_arg_empty_dict_names_every_missing_field() -> None:
    with pytest.raises(PoisonMessage) as info:
        DeliveryEnvelope.from_task_arg({})
    message = str(info.value)
    for field in ["delivery_id", "destination", "kind", "max_attempts", "created_at"]:
        assert f"{field}: Field required" in message


@pytest.mark.parametrize(
    ("event_changes", "expected"),
    [
        ({"idfa": "nope"}, "event.idfa: must be a UUID"),
        ({"country": "ZZ"}, "event.country: must be an ISO 3166-1"),
        ({"platform": "web"}, "event.platform: Input should be 'ios' or 'android'"),
        ({"bogus": 1}, "event.bogus: Extra inputs are not permitted"),
        ({"gaid": GAID}, "gaid/android_id: not allowed on an ios event"),
    ],
)
def test_from_task_arg_bad_nested_event_is_poison(
    event_changes: dict[str, Any], expected: str
) -> None:
    arg = make_envelope().to_task_arg()
    arg["event"] = {**arg["event"], **event_changes}
    with pytest.raises(PoisonMessage) as info:
        DeliveryEnvelope.from_task_arg(arg)
    assert str(info.value).startswith("envelope: ")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"event": "not an event"}, "event: Input should be a valid dictionary"),
        ({"max_attempts": 0}, "max_attempts: Input should be greater than or equal to 1"),
        ({"attempt": -1}, "attempt: Input should be greater than or equal to 0"),
        ({"created_at": "2024-05-01T12:00:00"}, "created_at: Input should have timezone info"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
        ({"destination": ""}, "destination: String should have at least 1 character"),
    ],
)
def test_from_task_arg_bad_field_is_poison(changes: dict[str, Any], expected: str) -> None:
    arg = {**make_envelope().to_task_arg(), **changes}
    with pytest.raises(PoisonMessage) as info:
        DeliveryEnvelope.from_task_arg(arg)
    assert expected in str(info.value)


def test_after_attempt_increments_attempt_and_appends_history() -> None:
    envelope = make_envelope()
    first = AttemptSummary(at=NOW, status=503, outcome="retry", error="HTTP 503")
    second = AttemptSummary(at=NOW + timedelta(minutes=1), status=None, outcome="timeout")
    once = envelope.after_attempt(first)
    twice = once.after_attempt(second)
    assert (envelope.attempt, once.attempt, twice.attempt) == (0, 1, 2)
    assert envelope.history == []
    assert once.history == [first]
    assert twice.history == [first, second]
    assert twice.delivery_id == envelope.delivery_id
    assert twice.event == envelope.event


def test_after_attempt_keeps_the_last_twenty_attempts() -> None:
    envelope = make_envelope(max_attempts=11)
    summaries = [
        AttemptSummary(at=NOW + timedelta(seconds=i), status=500, outcome=f"try-{i}")
        for i in range(25)
    ]
    for summary in summaries:
        envelope = envelope.after_attempt(summary)
    assert envelope.attempt == 25
    assert envelope.history == summaries[-20:]
    # still decodes after the round trip
    assert DeliveryEnvelope.from_task_arg(envelope.to_task_arg()).history == summaries[-20:]


def test_delivery_id_for_is_deterministic_and_per_destination() -> None:
    a = delivery_id_for("evt-1", "partner-a")
    assert a == delivery_id_for("evt-1", "partner-a")
    assert a != delivery_id_for("evt-1", "partner-b")
    assert a != delivery_id_for("evt-2", "partner-a")
    parsed = uuid.UUID(a)
    assert parsed.version == 5
    assert len(a) <= 64


def test_delivery_id_does_not_confuse_event_and_destination() -> None:
    assert delivery_id_for("a", "b") != delivery_id_for("b", "a")


def test_task_argsrepr_shows_ids_but_no_personal_data() -> None:
    envelope = make_envelope().after_attempt(AttemptSummary(at=NOW, outcome="retry"))
    text = envelope.task_argsrepr()
    assert envelope.delivery_id in text
    assert "partner-a" in text
    assert "purchase" in text
    assert "'attempt': 2" in text
    assert envelope.event.idfa is not None
    assert IDFA not in text
    assert IDFA.lower() not in text
    assert hashlib.sha1(IDFA.encode()).hexdigest() not in text
    assert "203.0.113.77" not in text


# --- regressions -------------------------------------------------------------------------------


@pytest.mark.parametrize("app_id", ["\u0661\u0662\u0663", "\uff11\uff12\uff13", "id\u0661\u0662"])
def test_ios_app_id_accepts_ascii_digits_only(app_id: str) -> None:
    with pytest.raises(InvalidEvent, match="app_id: an ios app id is the App Store id"):
        ConversionEvent.parse(ios(app_id=app_id))


def test_event_values_keys_are_kept_exactly_so_none_collide() -> None:
    event = ConversionEvent.parse(android(event_values={"a": 1, " a ": 2, "a\n": 3}))
    assert event.event_values == {"a": 1, " a ": 2, "a\n": 3}


def test_derived_event_id_ignores_how_an_amount_is_written() -> None:
    one = ConversionEvent.parse(android(revenue="1.5", currency="USD", revenue_usd="1.5"))
    other = ConversionEvent.parse(android(revenue="1.50", currency="USD", revenue_usd="1.500000"))
    assert one.event_id == other.event_id
    assert one.revenue == other.revenue
