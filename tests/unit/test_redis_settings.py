"""Redis instance settings (config/redis.py): every URL form parsed, every refusal naming its
environment variable and rule, nothing showing a password; and the client factory's view of
each form (workers/redis_clients.py)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr, ValidationError
from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection

from config.redis import RedisConfigError, RedisSettings, masked_url
from config.settings import Settings
from workers import redis_clients
from workers.redis_clients import BlockingSentinelConnectionPool


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("not checked until a connection is made")
    return path


@pytest.mark.parametrize(
    ("url", "form", "hosts", "db", "user", "password", "described"),
    [
        ("redis://127.0.0.1:6379/0", "redis", [("127.0.0.1", 6379)], 0, None, None,
         "redis://127.0.0.1:6379/0"),
        ("redis://cache", "redis", [("cache", 6379)], 0, None, None, "redis://cache:6379/0"),
        ("redis://:s3cret@cache:6380/4", "redis", [("cache", 6380)], 4, None, "s3cret",
         "redis://cache:6380/4"),
        ("rediss://app:p%40ss@r.example:6390/2", "rediss", [("r.example", 6390)], 2, "app",
         "p@ss", "rediss://app@r.example:6390/2 (TLS, verify CA system)"),
        ("redis://[::1]:7000/1", "redis", [("::1", 7000)], 1, None, None, "redis://[::1]:7000/1"),
        ("unix:///run/redis/redis.sock", "unix", [], 0, None, None,
         "unix:///run/redis/redis.sock?db=0"),
        ("unix://:pw@/run/redis.sock?db=3", "unix", [], 3, None, "pw",
         "unix:///run/redis.sock?db=3"),
        ("sentinel://:dpw@s1:26379,s2:26380,s3/5", "sentinel",
         [("s1", 26379), ("s2", 26380), ("s3", 26379)], 5, None, "dpw",
         "sentinel://s1:26379,s2:26380,s3:26379/5 (master relay)"),
    ],
)  # fmt: skip
def test_every_url_form_is_parsed(
    url: str,
    form: str,
    hosts: list[tuple[str, int]],
    db: int,
    user: str | None,
    password: str | None,
    described: str,
) -> None:
    conf = RedisSettings(url=url, sentinel_master="relay" if form == "sentinel" else None)
    assert conf.form == form
    assert list(conf.hosts) == hosts
    assert conf.db == db
    assert conf.username == user
    assert (conf.password.get_secret_value() if conf.password else None) == password
    assert conf.describe() == described
    if password:
        for shown in (conf.describe(), repr(conf), str(conf), conf.__json__()):
            assert password not in shown


def test_tls_described_with_its_ca_and_client_certificate(pem: Path) -> None:
    conf = RedisSettings(url="rediss://r:6390/0", tls_ca_file=pem, tls_cert_file=pem,
                         tls_key_file=pem)  # fmt: skip
    assert conf.describe() == f"rediss://r:6390/0 (TLS, verify CA {pem}, client cert {pem})"
    off = RedisSettings(url="rediss://r:6390/0", tls_verify=False)
    assert off.describe() == "rediss://r:6390/0 (TLS, verify off)"


def test_masked_url_hides_only_the_password() -> None:
    assert masked_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert masked_url("redis://:p@w@h/0") == "redis://:***@h/0"
    assert masked_url("redis://u@h/0") == "redis://u@h/0"
    assert masked_url("redis://h/0") == "redis://h/0"
    assert masked_url("u:pw@h:6379") == "u:***@h:6379"
    assert masked_url("redis://h/0?password=pw&db=1") == "redis://h/0?password=...&db=..."


def refusal(**values: Any) -> str:
    with pytest.raises(RedisConfigError) as caught:
        RedisSettings(**values)
    return str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"url": "http://h/0"}, "url: unsupported URL form 'http://'"),
        ({"url": "h:6379"}, "url: unsupported URL form 'without a scheme'"),
        ({"url": "redis:///0"}, "url: redis:// needs a host"),
        ({"url": "redis://h:99999/0"}, "url: Port out of range"),
        ({"url": "redis://h/zero"}, "url: the database must be a number >= 0, not 'zero'"),
        ({"url": "rediss://h/0?ssl_cert_reqs=none"},
         "url: query parameters (ssl_cert_reqs) are not read"),
        ({"url": "unix://host/run/r.sock"}, "url: a unix URL is unix:///path/to/redis.sock"),
        ({"url": "unix:///run/r.sock?timeout=1"}, "url: query parameters (timeout) are not read"),
        ({"url": "sentinel://s1:1;s2:2/0", "sentinel_master": "m"},
         "url: separate sentinels with commas"),
        ({"url": "sentinel://s1:1,:2/0", "sentinel_master": "m"},
         "url: sentinel:// needs host[:port][,host[:port]...]"),
        ({"url": "sentinel://s1/0"}, "sentinel_master: required with a sentinel:// URL"),
        ({"url": "redis://h/0", "sentinel_master": "m"},
         "sentinel_master: only read with a sentinel:// URL, not redis://"),
        ({"url": "rediss://h/0", "sentinel_password": SecretStr("x")},
         "sentinel_password: only read with a sentinel:// URL, not rediss://"),
        ({"url": "redis://h/0", "tls_verify": False},
         "tls_verify: only read with a rediss:// URL, not redis://"),
        ({"url": "rediss://h/0", "tls_ca_file": Path("/no/such/ca.pem")},
         "tls_ca_file: /no/such/ca.pem is not a readable file"),
    ],
)  # fmt: skip
def test_every_unsupported_or_inconsistent_form_is_refused(
    values: dict[str, Any], message: str
) -> None:
    assert message in refusal(**values)


@pytest.mark.parametrize("field", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
@pytest.mark.parametrize("url", ["redis://h/0", "unix:///r.sock", "sentinel://s/0"])
def test_tls_files_are_refused_without_rediss(field: str, url: str, pem: Path) -> None:
    master = {"sentinel_master": "m"} if url.startswith("sentinel") else {}
    form = url.partition(":")[0]
    extra = {"tls_cert_file": pem} if field == "tls_key_file" else {}
    assert f"{field}: only read with a rediss:// URL, not {form}://" in refusal(
        url=url, **master, **{field: pem}, **extra
    )


def test_a_client_key_needs_its_certificate_and_a_ca_needs_verification(pem: Path) -> None:
    assert "tls_key_file: a client key needs its certificate" in refusal(
        url="rediss://h/0", tls_key_file=pem
    )
    assert "tls_ca_file: a CA is only used to verify the server" in refusal(
        url="rediss://h/0", tls_ca_file=pem, tls_verify=False
    )


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="socket_timeout"):
        RedisSettings(socket_timeout=0)
    with pytest.raises(ValidationError, match="connect_timeout"):
        RedisSettings(connect_timeout=-1)


def test_a_refusal_never_shows_the_password() -> None:
    message = refusal(url="redis://:hunter2@h:99999/0")
    assert "hunter2" not in message
    assert "redis://:***@h:99999/0" in message


# --- Settings: the broker's and the state's instance from the environment -------------------


def test_the_state_instance_is_the_brokers_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:pw@cache:6380/3")
    monkeypatch.setenv("POSTBACK_RELAY_REDIS_SOCKET_TIMEOUT", "2.5")
    settings = Settings()
    assert not settings.separate_state
    assert settings.broker_redis.describe() == "redis://cache:6380/3"
    assert settings.broker_redis.socket_timeout == 2.5
    assert settings.state_redis == settings.broker_redis


def test_a_separate_state_instance_has_its_own_settings(
    monkeypatch: pytest.MonkeyPatch, pem: Path
) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_REDIS_URL", "redis://broker:6379/0")
    monkeypatch.setenv("POSTBACK_RELAY_STATE_REDIS_URL", "rediss://state:6390/1")
    monkeypatch.setenv("POSTBACK_RELAY_STATE_REDIS_TLS_CA_FILE", str(pem))
    monkeypatch.setenv("POSTBACK_RELAY_STATE_REDIS_CONNECT_TIMEOUT", "1")
    settings = Settings()
    assert settings.separate_state
    assert settings.broker_redis.describe() == "redis://broker:6379/0"
    assert settings.state_redis.describe() == f"rediss://state:6390/1 (TLS, verify CA {pem})"
    assert settings.state_redis.connect_timeout == 1
    assert settings.broker_redis.connect_timeout == 5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"POSTBACK_RELAY_REDIS_URL": "sentinel://s1,s2/0"},
         "POSTBACK_RELAY_REDIS_SENTINEL_MASTER: required with a sentinel:// URL"),
        ({"REDIS_URL": "memcached://h"}, "POSTBACK_RELAY_REDIS_URL: unsupported URL form"),
        ({"POSTBACK_RELAY_REDIS_TLS_VERIFY": "false"},
         "POSTBACK_RELAY_REDIS_TLS_VERIFY: only read with a rediss:// URL, not redis://"),
        ({"POSTBACK_RELAY_STATE_REDIS_URL": "unix:///r.sock",
          "POSTBACK_RELAY_STATE_REDIS_SENTINEL_MASTER": "m"},
         "POSTBACK_RELAY_STATE_REDIS_SENTINEL_MASTER: only read with a sentinel:// URL"),
        ({"POSTBACK_RELAY_STATE_REDIS_TLS_VERIFY": "false"},
         "POSTBACK_RELAY_STATE_REDIS_TLS_VERIFY: only read with "
         "POSTBACK_RELAY_STATE_REDIS_URL set (without it the state instance is the broker's)"),
    ],
)  # fmt: skip
def test_settings_refusals_name_the_environment_variable(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RedisConfigError) as caught:
        Settings()
    assert message in str(caught.value)


def test_settings_survive_a_round_trip_through_their_values() -> None:
    settings = Settings(redis_url="redis://:pw@h/1")
    again = Settings(**settings.model_dump())
    assert again.broker_redis == settings.broker_redis
    assert not again.separate_state


def test_a_bad_timeout_names_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTBACK_RELAY_STATE_REDIS_SOCKET_TIMEOUT", "0")
    with pytest.raises(ValidationError, match="state_redis_socket_timeout"):
        Settings()


# --- the factory's view of each form ----------------------------------------------------------


def test_tls_verifies_by_default_and_passes_every_file(pem: Path) -> None:
    conf = RedisSettings(url="rediss://:pw@r:6390/2", tls_ca_file=pem, tls_cert_file=pem,
                         tls_key_file=pem)  # fmt: skip
    kwargs = redis_clients.connection_kwargs(conf)
    assert kwargs["connection_class"] is redis_clients.TLSConnection
    assert issubclass(redis_clients.TLSConnection, redis.SSLConnection)
    assert kwargs["ca_setting"] == f"tls_ca_file={pem}"
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert kwargs["ssl_check_hostname"] is True
    assert kwargs["ssl_ca_certs"] == kwargs["ssl_certfile"] == kwargs["ssl_keyfile"] == str(pem)
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "r", 6390, 2, "pw")  # fmt: skip
    unverified = redis_clients.tls_options(RedisSettings(url="rediss://r/0", tls_verify=False))
    assert unverified["ssl_cert_reqs"] == ssl.CERT_NONE
    assert unverified["ssl_check_hostname"] is False


def test_a_unix_pool_has_no_tcp_arguments() -> None:
    pool = redis_clients.pool(RedisSettings(url="unix:///run/r.sock?db=2", socket_timeout=3))
    assert pool.connection_class is redis.UnixDomainSocketConnection
    assert pool.connection_kwargs["path"] == "/run/r.sock"
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["socket_timeout"] == 3
    assert not {"host", "port", "socket_keepalive"} & set(pool.connection_kwargs)


def test_a_bounded_client_waits_for_a_free_connection() -> None:
    client = redis_clients.client(RedisSettings(), pool_size=12)
    assert isinstance(client.connection_pool, redis.BlockingConnectionPool)
    assert client.connection_pool.max_connections == 12
    assert client.connection_pool.timeout == redis_clients.POOL_WAIT
    with pytest.raises(ValueError, match="a replica client needs a sentinel:// URL"):
        redis_clients.client(RedisSettings(), role="replica")


def test_a_sentinel_client_asks_the_sentinels_for_its_master() -> None:
    conf = RedisSettings(url="sentinel://:dpw@s1:26379,s2:26380/1", sentinel_master="relay",
                         sentinel_password=SecretStr("spw"))  # fmt: skip
    client = redis_clients.client(conf, pool_size=9)
    pool = client.connection_pool
    assert isinstance(pool, BlockingSentinelConnectionPool)
    assert pool.max_connections == 9
    assert pool.service_name == "relay"
    assert pool.is_master
    assert pool.connection_class is SentinelManagedConnection
    assert pool.connection_kwargs["password"] == "dpw"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    assert {s.connection_pool.connection_kwargs["password"] for s in sentinels} == {"spw"}
    replica = redis_clients.client(conf, role="replica").connection_pool
    assert isinstance(replica, SentinelConnectionPool)
    assert not replica.is_master


def test_kombu_gets_our_transport_and_verifying_tls_on_every_form(pem: Path) -> None:
    forms = {
        "redis://h/0": False,
        "unix:///r.sock": False,
        "sentinel://s1:1,s2:2/3": False,
        "rediss://h/0": True,
    }
    for url, tls in forms.items():
        master = {"sentinel_master": "m"} if url.startswith("sentinel") else {}
        conf = RedisSettings(url=url, **master)
        options = redis_clients.kombu_connection_options(conf)
        assert options["broker_transport"] == redis_clients.TRANSPORT, url
        assert options["broker_transport_options"]["redis_settings"] is conf
        assert bool(options["broker_use_ssl"]) is tls, url
        assert not {";", ","} & set(options["broker_url"]), url
    tls_options = redis_clients.kombu_connection_options(
        RedisSettings(url="rediss://h/0", tls_ca_file=pem)
    )["broker_use_ssl"]
    assert tls_options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert tls_options["ssl_ca_certs"] == str(pem)
