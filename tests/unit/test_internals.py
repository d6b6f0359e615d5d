"""The start-up check of the Celery/kombu internals we rely on (workers/broker/internals.py): the app
refuses to start against a kombu that differs, naming what changed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import kombu
import pytest
from kombu.transport import redis as kombu_redis

from config.destination_base import ConfigError
from config.destinations import load_destinations
from config.settings import Settings
from tests.helpers import ROOT
from workers.app import create_app
from workers.broker.internals import INTERNALS, TESTED_SERIES, internals_problems
from workers.broker.transport import Channel


@pytest.fixture
def build(net_destination: Path) -> Callable[..., object]:
    def make(**settings: object) -> object:
        return create_app(
            Settings(destinations_file=net_destination, **settings),  # type: ignore[arg-type]
            load_destinations(net_destination),
        )

    return make


def test_the_installed_releases_are_the_tested_ones_and_the_app_builds(
    build: Callable[..., object],
) -> None:
    assert internals_problems([], []) == []
    assert kombu.__version__.startswith(TESTED_SERIES["kombu"] + ".")
    build()


def test_a_missing_private_method_stops_the_app_naming_it(
    build: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(kombu_redis.Channel, "_brpop_read")
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert "kombu.transport.redis.Channel._brpop_read is missing" in message
    assert "workers/broker/transport.py" in message


def test_a_changed_signature_stops_the_app_naming_old_and_new(
    build: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    def restore_by_tag(self: object, tag: str, leftmost: bool = False) -> None: ...

    monkeypatch.setattr(kombu_redis.QoS, "restore_by_tag", restore_by_tag)
    with pytest.raises(ConfigError) as info:
        build()
    assert (
        "kombu.transport.redis.QoS.restore_by_tag takes (tag, leftmost), "
        "not (tag, client, leftmost)" in str(info.value)
    )


def test_an_untested_release_stops_the_app_unless_allowed(
    build: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kombu, "__version__", "5.8.0")
    with pytest.raises(ConfigError) as info:
        build()
    assert "kombu 5.8.0 is installed; postback-relay is tested with kombu 5.7.x" in str(info.value)
    build(allow_untested_releases=True)  # the symbol checks still pass: it starts


def test_a_transport_option_kombu_does_not_read_is_refused() -> None:
    problems = internals_problems(
        ["visibility_timeout", "unacked_restore_every"], Channel.from_transport_options
    )
    assert problems == [
        "transport option(s) unacked_restore_every are not read by kombu's Redis channel "
        "(kombu would ignore them silently)"
    ]


def test_every_internal_is_checked_by_name_and_owner() -> None:
    paths = [i.path for i in INTERNALS]
    assert len(paths) == len(set(paths))
    assert all(i.problem() is None for i in INTERNALS)


@pytest.mark.integration
def test_a_worker_against_a_changed_kombu_refuses_to_start(
    net_destination: Path, tmp_path: Path, redis_url: str
) -> None:
    """A real `postback-relay worker` whose kombu lost a private method (patched at interpreter
    start, as a new release would ship it) exits 2 before consuming, naming the method."""
    (tmp_path / "sitecustomize.py").write_text(
        "from kombu.transport import redis\ndel redis.Channel._brpop_read\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "POSTBACK_RELAY_REDIS_URL": redis_url,
           "POSTBACK_RELAY_DESTINATIONS_FILE": str(net_destination)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", "worker", "--queues", "templated"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "kombu.transport.redis.Channel._brpop_read is missing" in result.stderr
    assert "ready." not in result.stdout + result.stderr
