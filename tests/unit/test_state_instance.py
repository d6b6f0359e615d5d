"""Producers and workers agree on where the state lives (workers/state_instance.py): a worker
announces it on the broker; a producer, however it is built (from settings, by the API),
refuses a shared/separate disagreement, naming the setting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from config.destination_base import ConfigError
from config.destinations import load_destinations
from config.keys import WORKER_KEY_PREFIXES, RedisKeys
from config.settings import Settings
from producers.produce import Producer
from workers import state_instance

KEYS = RedisKeys("pr")


def settings(redis_url: str, path: Path, state_url: str | None = None) -> Settings:
    return Settings(redis_url=redis_url, destinations_file=path, state_redis_url=state_url)


@pytest.fixture
def path(write_destinations: Callable[[str], Path]) -> Path:
    return write_destinations(
        """
[[destination]]
name = "net"
kind = "templated"
url = "http://127.0.0.1:9/pb"
[[destination.routes]]
type = "install"
"""
    )


def other_db(url: str) -> str:
    base, _, db = url.rpartition("/")
    return f"{base}/{(int(db or 0) + 8) % 16}"


def test_a_producer_without_the_workers_state_instance_is_refused_naming_the_setting(
    redis_url: str, redis_client: redis.Redis, path: Path
) -> None:
    workers = settings(redis_url, path, state_url=other_db(redis_url))
    state_instance.announce(redis_client, KEYS, workers)
    assert redis_client.get(KEYS.state_instance()) == workers.state_redis.describe().encode()
    with pytest.raises(ConfigError, match="POSTBACK_RELAY_STATE_REDIS_URL") as refused:
        Producer.from_settings(settings(redis_url, path))
    assert "the broker's instance" in str(refused.value)
    assert redis_client.dbsize() == 2  # nothing written but the announcement (and the prefix)
    # The same settings as the workers': accepted.
    result = Producer.from_settings(workers).produce({"event_id": "e1", **EVENT})
    assert len(result.accepted) == 1


def test_a_producer_with_a_state_instance_the_workers_do_not_use_is_refused(
    redis_url: str, redis_client: redis.Redis, path: Path
) -> None:
    state_instance.announce(redis_client, KEYS, settings(redis_url, path))
    with pytest.raises(ConfigError, match="the workers on this broker keep their state in the"):
        Producer.from_settings(settings(redis_url, path, state_url=other_db(redis_url)))
    Producer.from_settings(settings(redis_url, path))  # agrees


def test_a_producer_with_another_key_prefix_than_every_worker_is_refused_naming_the_setting(
    redis_url: str, redis_client: redis.Redis, path: Path
) -> None:
    state_instance.announce(redis_client, KEYS, settings(redis_url, path))
    state_instance.announce(redis_client, RedisKeys("blue"), settings(redis_url, path))
    assert redis_client.hkeys(WORKER_KEY_PREFIXES) == [b"pr", b"blue"]
    other = Settings(redis_url=redis_url, destinations_file=path, key_prefix="green")
    before = redis_client.dbsize()
    with pytest.raises(ConfigError, match="POSTBACK_RELAY_KEY_PREFIX") as refused:
        Producer.from_settings(other)
    assert "'blue' or 'pr', this process 'green'" in str(refused.value)
    assert redis_client.dbsize() == before  # nothing written
    # A prefix some worker uses: accepted, and its delivery is in that prefix's ledger.
    blue = Settings(redis_url=redis_url, destinations_file=path, key_prefix="blue")
    result = Producer.from_settings(blue).produce({"event_id": "e1", **EVENT})
    assert redis_client.zscore(RedisKeys("blue").ledger(), result.accepted[0]) is not None


def test_nothing_announced_or_an_unreachable_broker_is_no_reason_to_refuse(
    redis_url: str, redis_client: redis.Redis, path: Path
) -> None:
    Producer.from_settings(settings(redis_url, path, state_url=other_db(redis_url)))
    down = redis.Redis(host="127.0.0.1", port=9, socket_connect_timeout=0.5)
    state_instance.check(down, KEYS, settings(redis_url, path, state_url=other_db(redis_url)))


EVENT = {
    "event_name": "install",
    "platform": "ios",
    "app_id": "id123456789",
    "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
    "event_time": "2026-12-01T12:00:00Z",
}


def test_the_api_refuses_to_start_with_a_state_instance_the_workers_do_not_use(
    redis_url: str, redis_client: redis.Redis, path: Path
) -> None:
    from workers.api.app import create_api

    state_instance.announce(redis_client, KEYS, settings(redis_url, path, other_db(redis_url)))
    agreeing = settings(redis_url, path, state_url=other_db(redis_url))
    create_api(agreeing, load_destinations(path), [])
    with pytest.raises(ConfigError, match="POSTBACK_RELAY_STATE_REDIS_URL"):
        create_api(settings(redis_url, path), load_destinations(path), [])
