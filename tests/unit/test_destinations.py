"""Unit tests of config.destinations: loading, validation messages, secrets, routing, retries."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from config.destination_base import ConfigError, RetryPolicy, Route
from config.destinations import Destinations, load_destinations
from config.kinds import KINDS
from config.kinds.templated import TemplatedDestination
from schemas.event import ConversionEvent

SECRET = "tok-Zq81-very-secret"
FILE_SECRET = "file-secret-Hx72"

TWO_DESTINATIONS = """
[[destination]]
kind = "templated"
name = "alpha"
url = "https://alpha.example.com/pb?idfa={idfa}&event={event_name}&key={credential:token}"
rate_limit = "50/second"
credentials = { token = { env = "ALPHA_TOKEN" } }
retry = { max_attempts = 3, base_seconds = 10, jitter = 0 }

[[destination.routes]]
type = "install"

[[destination.routes]]
type = "event"
events = ["purchase"]
delay_seconds = 30
max_delivery_attempts = 2

[[destination]]
kind = "templated"
name = "beta"
url = "https://beta.example.com/postback"
method = "POST"
body = { id = "(advertiserId)", name = "(event-name)" }
headers = { Authorization = "Bearer {credential:key}" }
credentials = { key = { file = '{key_file}' } }
rate_limit = "60000 per 15 minutes"
routes = [{ type = "event", apps = ["com.example.game"] }]
"""


def write(tmp_path: Path, text: str, name: str = "destinations.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Destinations:
    """The file as a process that sends to every destination sees it: secrets read."""
    path = write(tmp_path, text)
    return load_destinations(path).with_secrets({} if environ is None else environ, kinds=KINDS)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "beta_key"
    path.write_text(f"  {FILE_SECRET}\n\n")
    return path


@pytest.fixture
def loaded(tmp_path: Path, key_file: Path) -> Destinations:
    text = TWO_DESTINATIONS.replace("{key_file}", str(key_file))
    return load_text(tmp_path, text, {"ALPHA_TOKEN": SECRET})


def event(name: str = "install", app_id: str = "com.example.game", **extra: Any) -> ConversionEvent:
    platform = "android" if "." in app_id else "ios"
    return ConversionEvent(
        app_id=app_id,
        platform=platform,
        event_name=name,
        event_time=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        **extra,
    )


# --- loading a valid file ----------------------------------------------------------------------


def test_valid_file_loads_both_destinations(loaded: Destinations) -> None:
    assert len(loaded) == 2
    assert [d.name for d in loaded] == ["alpha", "beta"]
    assert loaded.kinds == {"templated"}
    alpha = loaded.get("alpha")
    beta = loaded.get("beta")
    assert isinstance(alpha, TemplatedDestination)
    assert isinstance(beta, TemplatedDestination)
    assert alpha.method == "GET"
    assert alpha.retry.max_attempts == 3
    assert [r.type for r in alpha.routes] == ["install", "event"]
    assert alpha.routes[1].events == ["purchase"]
    assert alpha.routes[1].delay_seconds == 30
    assert alpha.routes[1].max_delivery_attempts == 2
    assert alpha.url_template.credentials == frozenset({"token"})
    assert beta.method == "POST"
    assert set(beta.body_templates) == {"id", "name"}
    assert set(beta.header_templates) == {"Authorization"}
    assert beta.routes[0].apps == ["com.example.game"]


def test_secret_resolves_from_env(loaded: Destinations) -> None:
    alpha = loaded.get("alpha")
    assert alpha.secret("token") == SECRET
    assert alpha.secret_values() == {"token": SECRET}


def test_secret_resolves_from_file_stripped(loaded: Destinations) -> None:
    beta = loaded.get("beta")
    assert beta.secret("key") == FILE_SECRET
    assert beta.secret_values() == {"key": FILE_SECRET}


def test_environ_argument_is_used_instead_of_process_env(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPHA_TOKEN", "from-process-env")
    text = TWO_DESTINATIONS.replace("{key_file}", str(key_file))
    dests = load_destinations(write(tmp_path, text)).with_secrets(
        {"ALPHA_TOKEN": SECRET}, kinds=KINDS
    )
    assert dests.get("alpha").secret("token") == SECRET


def test_process_env_is_used_when_no_environ_given(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPHA_TOKEN", "from-process-env")
    text = TWO_DESTINATIONS.replace("{key_file}", str(key_file))
    dests = load_destinations(write(tmp_path, text)).with_secrets(kinds=KINDS)
    assert dests.get("alpha").secret("token") == "from-process-env"


def test_repr_and_str_never_show_secret_values(loaded: Destinations) -> None:
    for dest in loaded:
        shown = [
            repr(dest),
            str(dest),
            repr(dest.credentials),
            str(dest.credentials),
            dest.model_dump_json(),
            repr(dest.model_dump()),
        ]
        for text in shown:
            assert SECRET not in text
            assert FILE_SECRET not in text
    # the references themselves are visible, so an operator can see where a secret comes from
    assert "ALPHA_TOKEN" in repr(loaded.get("alpha").credentials)


def test_rate_limits_parse(loaded: Destinations) -> None:
    alpha_limit = loaded.get("alpha").rate_limit_item
    beta_limit = loaded.get("beta").rate_limit_item
    assert alpha_limit is not None
    assert beta_limit is not None
    assert alpha_limit.amount == 50
    assert alpha_limit.get_expiry() == 1
    assert beta_limit.amount == 60000
    assert beta_limit.get_expiry() == 15 * 60


def test_no_rate_limit_means_no_item(tmp_path: Path) -> None:
    dests = load_text(tmp_path, dest_toml())
    assert dests.get("net").rate_limit is None
    assert dests.get("net").rate_limit_item is None


# --- errors ------------------------------------------------------------------------------------

BASE_URL = "https://example.com/pb?idfa={idfa}"


def dest_toml(
    *,
    name: str | None = "net",
    kind: str | None = "templated",
    url: str = BASE_URL,
    extra: str = "",
    routes: str | None = 'routes = [{ type = "install" }]',
) -> str:
    lines = ["[[destination]]"]
    if kind is not None:
        lines.append(f'kind = "{kind}"')
    if name is not None:
        lines.append(f'name = "{name}"')
    lines.append(f"url = '{url}'")
    if extra:
        lines.append(extra)
    if routes is not None:
        lines.append(routes)
    return "\n".join(lines) + "\n"


# (id, toml, environ, destination label, field, rule)
ERROR_CASES: list[tuple[str, str, dict[str, str], str, str, str]] = [
    (
        "unknown-kind",
        dest_toml(kind="appsflyer"),
        {},
        "'net'",
        "kind",
        "must be one of templated, x_mact, xmp, redeliver (got 'appsflyer')",
    ),
    (
        "missing-kind-named",
        dest_toml(kind=None),
        {},
        "'net'",
        "kind",
        "must be one of templated, x_mact, xmp, redeliver (got None)",
    ),
    (
        "missing-kind-unnamed",
        dest_toml(kind=None, name=None),
        {},
        "#1",
        "kind",
        "must be one of templated",
    ),
    (
        "missing-name",
        dest_toml(name=None),
        {},
        "#1",
        "name",
        "Field required",
    ),
    (
        "unknown-macro-in-url",
        dest_toml(url="https://example.com/pb?x={no_such_macro}"),
        {},
        "'net'",
        "url",
        "unknown macro {no_such_macro}",
    ),
    (
        "macro-in-host",
        dest_toml(url="https://{idfa}.example.com/pb"),
        {},
        "'net'",
        "url",
        "literal host",
    ),
    (
        "macro-touching-host",
        dest_toml(url="https://example.com{idfa}"),
        {},
        "'net'",
        "url",
        "may not touch the host",
    ),
    (
        "ftp-scheme",
        dest_toml(url="ftp://example.com/pb?idfa={idfa}"),
        {},
        "'net'",
        "url",
        "http:// or https://",
    ),
    (
        "missing-env-secret",
        dest_toml(
            url="https://example.com/pb?k={credential:tok}",
            extra='credentials = { tok = { env = "NOT_SET_ANYWHERE" } }',
        ),
        {},
        "'net'",
        "credentials.tok",
        "environment variable NOT_SET_ANYWHERE is not set or is empty",
    ),
    (
        "empty-env-secret",
        dest_toml(
            url="https://example.com/pb?k={credential:tok}",
            extra='credentials = { tok = { env = "EMPTY_VAR" } }',
        ),
        {"EMPTY_VAR": ""},
        "'net'",
        "credentials.tok",
        "environment variable EMPTY_VAR is not set or is empty",
    ),
    (
        "env-and-file",
        dest_toml(
            url="https://example.com/pb?k={credential:tok}",
            extra='credentials = { tok = { env = "X", file = "/run/secrets/x" } }',
        ),
        {"X": "some-value"},
        "'net'",
        "credentials.tok",
        "give exactly one of",
    ),
    (
        "neither-env-nor-file",
        dest_toml(
            url="https://example.com/pb?k={credential:tok}",
            extra="credentials = { tok = {} }",
        ),
        {},
        "'net'",
        "credentials.tok",
        "give exactly one of",
    ),
    (
        "undeclared-credential",
        dest_toml(url="https://example.com/pb?k={credential:x}"),
        {},
        "'net'",
        "url",
        "names credential 'x', which is not declared under credentials",
    ),
    (
        "bad-rate-limit",
        dest_toml(extra='rate_limit = "lots please"'),
        {},
        "'net'",
        "rate_limit",
        'must read like "50/second"',
    ),
    (
        "delay-601",
        dest_toml(routes='routes = [{ type = "install", delay_seconds = 601 }]'),
        {},
        "'net'",
        "routes.0.delay_seconds",
        "less than or equal to 600",
    ),
    (
        "delay-negative",
        dest_toml(routes='routes = [{ type = "install", delay_seconds = -1 }]'),
        {},
        "'net'",
        "routes.0.delay_seconds",
        "greater than or equal to 0",
    ),
    (
        "route-attempts-11",
        dest_toml(routes='routes = [{ type = "install", max_delivery_attempts = 11 }]'),
        {},
        "'net'",
        "routes.0.max_delivery_attempts",
        "less than or equal to 10",
    ),
    (
        "retry-attempts-11",
        dest_toml(extra="retry = { max_attempts = 11 }"),
        {},
        "'net'",
        "retry.max_attempts",
        "less than or equal to 10",
    ),
    (
        "route-type-purchase",
        dest_toml(routes='routes = [{ type = "install" }, { type = "purchase" }]'),
        {},
        "'net'",
        "routes.1.type",
        "'install' or 'event'",
    ),
    (
        "install-route-with-events",
        dest_toml(routes='routes = [{ type = "install", events = ["purchase"] }]'),
        {},
        "'net'",
        "routes.0: events",
        "an install route matches installs only",
    ),
    (
        "body-on-get",
        dest_toml(extra='body = { id = "(idfa)" }'),
        {},
        "'net'",
        "body",
        'a body template needs method = "POST"',
    ),
    (
        "header-with-event-macro",
        dest_toml(extra='headers = { X-Device = "(idfa)" }'),
        {},
        "'net'",
        "headers.X-Device",
        "(credential:NAME) macros only",
    ),
    (
        "empty-routes",
        dest_toml(routes="routes = []"),
        {},
        "'net'",
        "routes",
        "at least 1 item",
    ),
    (
        "missing-routes",
        dest_toml(routes=None),
        {},
        "'net'",
        "routes",
        "Field required",
    ),
    (
        "unknown-destination-key",
        dest_toml(extra='colour = "blue"'),
        {},
        "'net'",
        "colour",
        "Extra inputs are not permitted",
    ),
    (
        "duplicate-name",
        dest_toml() + dest_toml(url="https://other.example.com/pb"),
        {},
        "'net'",
        "name",
        "used twice",
    ),
    (
        "second-destination-unnamed",
        dest_toml() + dest_toml(name=None, kind=None),
        {},
        "#2",
        "kind",
        "must be one of templated",
    ),
]


@pytest.mark.parametrize(
    ("text", "environ", "label", "field", "rule"),
    [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES],
)
def test_errors_name_destination_field_and_rule(
    tmp_path: Path, text: str, environ: dict[str, str], label: str, field: str, rule: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_destinations(path).with_secrets(environ, kinds=KINDS)
    message = str(excinfo.value)
    assert str(path) in message
    assert f"destination {label}:" in message
    assert f"{field}:" in message
    assert rule in message


def test_unreadable_secret_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    text = dest_toml(
        url="https://example.com/pb?k={credential:tok}",
        extra=f"credentials = {{ tok = {{ file = '{missing}' }} }}",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_text(tmp_path, text)
    message = str(excinfo.value)
    assert "destination 'net':" in message
    assert "credentials.tok:" in message
    assert f"secret file {missing} cannot be read" in message


def test_secret_file_that_is_a_directory_is_unreadable(tmp_path: Path) -> None:
    text = dest_toml(
        url="https://example.com/pb?k={credential:tok}",
        extra=f"credentials = {{ tok = {{ file = '{tmp_path}' }} }}",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_text(tmp_path, text)
    message = str(excinfo.value)
    assert "destination 'net':" in message
    assert "credentials.tok:" in message
    assert "cannot be read" in message


def test_empty_secret_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty-secret"
    empty.write_text("  \n\n")
    text = dest_toml(
        url="https://example.com/pb?k={credential:tok}",
        extra=f"credentials = {{ tok = {{ file = '{empty}' }} }}",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_text(tmp_path, text)
    message = str(excinfo.value)
    assert "destination 'net':" in message
    assert "credentials.tok:" in message
    assert f"secret file {empty} is empty" in message


def test_secret_errors_do_not_echo_other_secrets(tmp_path: Path) -> None:
    text = dest_toml(
        url="https://example.com/pb?a={credential:a}&b={credential:b}",
        extra='credentials = { a = { env = "A_SET" }, b = { env = "B_UNSET" } }',
    )
    with pytest.raises(ConfigError) as excinfo:
        load_text(tmp_path, text, {"A_SET": SECRET})
    assert "credentials.b:" in str(excinfo.value)
    assert SECRET not in str(excinfo.value)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "destinations_version = 2\n\n" + dest_toml())
    with pytest.raises(ConfigError) as excinfo:
        load_destinations(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "unknown top-level key" in message
    assert "destinations_version" in message


def test_destination_must_be_an_array_of_tables(tmp_path: Path) -> None:
    path = write(tmp_path, '[destination]\nkind = "templated"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_destinations(path)
    assert "destination: must be an array of tables" in str(excinfo.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[[destination]]\nkind = "templated\n')
    with pytest.raises(ConfigError) as excinfo:
        load_destinations(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "not valid TOML" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_destinations(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "cannot be read" in message
    assert "POSTBACK_RELAY_DESTINATIONS_FILE" in message


def test_first_bad_destination_stops_loading(tmp_path: Path) -> None:
    text = (
        dest_toml(name="good")
        + dest_toml(name="first-bad", url="https://example.com/pb?x={nope}")
        + dest_toml(name="second-bad", kind="unknown")
    )
    with pytest.raises(ConfigError) as excinfo:
        load_text(tmp_path, text)
    message = str(excinfo.value)
    assert "destination 'first-bad': url: unknown macro {nope}" in message
    assert "second-bad" not in message
    assert "'good'" not in message


def test_secret_failure_after_valid_destinations_loads_nothing(tmp_path: Path) -> None:
    text = dest_toml(name="good") + dest_toml(
        name="needs-secret",
        url="https://example.com/pb?k={credential:tok}",
        extra='credentials = { tok = { env = "MISSING_TOKEN" } }',
    )
    result: Destinations | None = None
    with pytest.raises(ConfigError, match=r"destination 'needs-secret': credentials\.tok:"):
        result = load_text(tmp_path, text)
    assert result is None


# --- routing -----------------------------------------------------------------------------------


def routed(dests: Destinations, ev: ConversionEvent) -> dict[str, Route]:
    return {dest.name: route for dest, route in dests.routes_for(ev)}


def test_install_route_matches_installs_only() -> None:
    route = Route(type="install")
    assert route.matches(event("install"))
    assert not route.matches(event("purchase"))
    assert not route.matches(event("Install"))


def test_event_route_with_filter_matches_listed_names_only() -> None:
    route = Route(type="event", events=["purchase", "level_up"])
    assert route.matches(event("purchase"))
    assert route.matches(event("level_up"))
    assert not route.matches(event("registration"))
    assert not route.matches(event("install"))


def test_event_route_listing_install_still_never_matches_installs() -> None:
    route = Route(type="event", events=["install", "purchase"])
    assert not route.matches(event("install"))
    assert route.matches(event("purchase"))


def test_event_route_without_filter_matches_every_non_install() -> None:
    route = Route(type="event")
    for name in ("purchase", "registration", "level_up", "x"):
        assert route.matches(event(name))
    assert not route.matches(event("install"))


def test_apps_filter() -> None:
    route = Route(type="event", apps=["com.example.game"])
    assert route.matches(event("purchase", app_id="com.example.game"))
    assert not route.matches(event("purchase", app_id="com.example.other"))


@pytest.mark.parametrize("event_app", ["id123", "123"])
@pytest.mark.parametrize("config_app", ["123", "id123"])
def test_ios_numeric_app_id_in_config_matches_id_prefixed_event(
    config_app: str, event_app: str
) -> None:
    route = Route(type="install", apps=[config_app])
    assert route.apps == ["id123"]
    ev = event("install", app_id=event_app)
    assert ev.app_id == "id123"
    assert route.matches(ev)
    assert not route.matches(event("install", app_id="id1234"))


def test_inactive_route_never_matches() -> None:
    assert not Route(type="install", active=False).matches(event("install"))
    assert not Route(type="event", active=False).matches(event("purchase"))


def test_routes_for_across_destinations(loaded: Destinations) -> None:
    install = routed(loaded, event("install"))
    assert set(install) == {"alpha"}
    assert install["alpha"].type == "install"

    purchase = routed(loaded, event("purchase"))
    assert set(purchase) == {"alpha", "beta"}
    assert purchase["alpha"].delay_seconds == 30

    other_event = routed(loaded, event("registration"))
    assert set(other_event) == {"beta"}

    other_app = routed(loaded, event("registration", app_id="com.example.other"))
    assert other_app == {}


def test_inactive_destination_never_matches(tmp_path: Path) -> None:
    text = dest_toml(name="off", extra="active = false") + dest_toml(name="on")
    dests = load_text(tmp_path, text)
    off = dests.get("off")
    assert off.routes[0].matches(event("install"))  # the route alone would match
    assert off.route_for(event("install")) is None
    assert set(routed(dests, event("install"))) == {"on"}


def test_inactive_route_skipped_in_destination(tmp_path: Path) -> None:
    routes = (
        'routes = [{ type = "install", active = false, delay_seconds = 5 },'
        ' { type = "install", delay_seconds = 9 }]'
    )
    dests = load_text(tmp_path, dest_toml(routes=routes))
    assert routed(dests, event("install"))["net"].delay_seconds == 9


def test_first_matching_route_wins(tmp_path: Path) -> None:
    routes = (
        'routes = [{ type = "event", events = ["level_up"], delay_seconds = 1 },'
        ' { type = "event", events = ["purchase"], delay_seconds = 10 },'
        ' { type = "event", delay_seconds = 20 },'
        ' { type = "event", events = ["purchase"], delay_seconds = 30 }]'
    )
    dests = load_text(tmp_path, dest_toml(routes=routes))
    assert routed(dests, event("purchase"))["net"].delay_seconds == 10
    assert routed(dests, event("level_up"))["net"].delay_seconds == 1
    assert routed(dests, event("other"))["net"].delay_seconds == 20
    assert len(dests.routes_for(event("purchase"))) == 1


# --- retry policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_number", "expected"),
    [(1, 30.0), (2, 60.0), (3, 120.0), (4, 240.0), (7, 1920.0), (8, 3600.0), (10, 3600.0)],
)
def test_exponential_backoff_without_jitter(retry_number: int, expected: float) -> None:
    policy = RetryPolicy(base_seconds=30, factor=2, cap_seconds=3600, jitter=0)
    assert policy.delay_for(retry_number) == expected


def test_exponential_backoff_other_factor() -> None:
    policy = RetryPolicy(base_seconds=5, factor=3, cap_seconds=100, jitter=0)
    assert [policy.delay_for(n) for n in range(1, 6)] == [5.0, 15.0, 45.0, 100.0, 100.0]


def test_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(base_seconds=30, factor=2, cap_seconds=3600, jitter=0.2)
    flat = RetryPolicy(base_seconds=30, factor=2, cap_seconds=3600, jitter=0)
    rng = random.Random(20240501)
    ratios = []
    for retry_number in range(1, 11):
        nominal = flat.delay_for(retry_number)
        for _ in range(50):
            value = policy.delay_for(retry_number, rng)
            assert nominal * 0.8 <= value <= nominal * 1.2
            ratios.append(value / nominal)
    # jitter is actually applied and spreads both ways
    assert min(ratios) < 0.9
    assert max(ratios) > 1.1


def test_jitter_is_reproducible_with_seeded_rng() -> None:
    policy = RetryPolicy(jitter=0.2)
    first = [policy.delay_for(n, random.Random(7)) for n in range(1, 6)]
    second = [policy.delay_for(n, random.Random(7)) for n in range(1, 6)]
    assert first == second


@pytest.mark.parametrize(
    ("retry_number", "expected"),
    [(1, 10.0), (2, 60.0), (3, 300.0), (4, 300.0), (10, 300.0)],
)
def test_explicit_schedule(retry_number: int, expected: float) -> None:
    policy = RetryPolicy(schedule=[10, 60, 300], jitter=0, base_seconds=1, cap_seconds=2)
    assert policy.delay_for(retry_number) == expected


def test_explicit_schedule_with_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(schedule=[10, 60, 300], jitter=0.2)
    rng = random.Random(3)
    for retry_number, nominal in [(1, 10.0), (2, 60.0), (3, 300.0), (5, 300.0)]:
        value = policy.delay_for(retry_number, rng)
        assert nominal * 0.8 <= value <= nominal * 1.2
