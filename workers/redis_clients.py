"""The one place that builds Redis clients and connection pools, for every URL form of
config/redis.py: the worker runtime, the producer, the CLI, the limiter and kombu's transport
(workers/broker/transport.py builds its pools here too) all take theirs from this module.

TLS verifies the server by default (``CERT_REQUIRED`` and the host name): kombu's own rediss://
handling falls back to ``CERT_NONE`` when it is given no options, and a man in the middle would
then read every postback. Sentinel clients follow the master the sentinels name, through
redis-py's ``Sentinel.master_for``.
"""

from __future__ import annotations

import ssl
from typing import Any, Literal
from urllib.parse import quote

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from config.redis import RedisSettings
from config.settings import Settings
from schemas.errors import PostbackRelayError

# Seconds between redis-py's PINGs on a connection idle this long before it is used again: a
# connection a NAT or load balancer dropped silently fails its check, not a command.
HEALTH_CHECK_INTERVAL = 30
# Seconds a caller of a bounded (blocking) pool waits for a free connection before it fails.
POOL_WAIT = 10
TRANSPORT = "workers.broker.transport:Transport"
# Keyword arguments redis-py's TCP connections take and a unix socket's do not.
TCP_ONLY = ("host", "port", "socket_keepalive", "socket_keepalive_options")

Role = Literal["master", "replica"]


class TLSConnection(redis.SSLConnection):
    """redis-py's TLS connection, whose certificate verification failure says which setting
    holds the CA it was checked against (redis-py says only "certificate verify failed")."""

    def __init__(self, *, ca_setting: str = "the system's CAs", **kwargs: Any) -> None:
        # kombu's transport passes ours on (workers/broker/transport.py), so its connections
        # say the same.
        super().__init__(**kwargs)
        self.ca_setting = ca_setting

    def _connect(self) -> Any:
        try:
            return super()._connect()  # type: ignore[no-untyped-call]
        except ssl.SSLCertVerificationError as exc:
            if "mismatch" in str(exc.verify_message):  # a good certificate, for another name
                why = (
                    f"the server's certificate is not for {self.host} ({exc.verify_message}); "
                    "connect by a name or address it lists"
                )
            else:
                why = (
                    f"the server's certificate failed verification ({exc.verify_message}) "
                    f"against {self.ca_setting}, which must hold the CA that signed it"
                )
            # Two arguments: redis-py's message is "Error TLS connecting to HOST:PORT. WHY."
            raise TLSVerificationFailed("TLS", why) from exc


class TLSVerificationFailed(PostbackRelayError, ssl.SSLCertVerificationError):
    """The server's certificate did not verify: a configuration error, not an outage."""

    def __str__(self) -> str:
        return str(self.args[-1])


class BlockingSentinelConnectionPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel pool that waits for a free connection (up to ``timeout``) when all are taken,
    instead of failing with MaxConnectionsError as redis-py's own Sentinel pool does."""


def tls_options(conf: RedisSettings) -> dict[str, Any]:
    """redis-py's (and kombu's ``broker_use_ssl``) TLS options of a rediss:// instance."""
    return {
        "ssl_cert_reqs": ssl.CERT_REQUIRED if conf.tls_verify else ssl.CERT_NONE,
        "ssl_check_hostname": conf.tls_verify,
        "ssl_ca_certs": str(conf.tls_ca_file) if conf.tls_ca_file else None,
        "ssl_certfile": str(conf.tls_cert_file) if conf.tls_cert_file else None,
        "ssl_keyfile": str(conf.tls_key_file) if conf.tls_key_file else None,
    }


def connection_class(conf: RedisSettings) -> type[redis.connection.AbstractConnection]:
    if conf.form == "unix":
        return redis.UnixDomainSocketConnection
    if conf.form == "rediss":
        return TLSConnection
    if conf.form == "sentinel":
        return SentinelManagedConnection
    return redis.Connection


def connection_kwargs(conf: RedisSettings) -> dict[str, Any]:
    """What each connection to the instance takes (with Sentinel: to the master or replica
    the sentinels name, so no host or port)."""
    kwargs: dict[str, Any] = {
        "db": conf.db,
        "username": conf.username,
        "password": conf.password.get_secret_value() if conf.password else None,
        "socket_timeout": conf.socket_timeout,
        "socket_connect_timeout": conf.connect_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry_on_timeout": True,
        "connection_class": connection_class(conf),
    }
    if conf.form == "unix":
        kwargs["path"] = conf.socket_path
        return kwargs
    kwargs["socket_keepalive"] = True
    if conf.form in {"redis", "rediss"}:
        kwargs["host"], kwargs["port"] = conf.hosts[0]
    if conf.form == "rediss":
        kwargs |= tls_options(conf)
        ca_setting = conf.setting_name("tls_ca_file")
        kwargs["ca_setting"] = (
            f"{ca_setting}={conf.tls_ca_file}"
            if conf.tls_ca_file
            else f"the system's CAs ({ca_setting} unset)"
        )
    return kwargs


def sentinels(conf: RedisSettings) -> Sentinel:
    """The sentinels of a sentinel:// instance, with their own password and timeouts."""
    password = conf.sentinel_password.get_secret_value() if conf.sentinel_password else None
    return Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
        list(conf.hosts),
        sentinel_kwargs={
            "password": password,
            "socket_timeout": conf.socket_timeout,
            "socket_connect_timeout": conf.connect_timeout,
            "socket_keepalive": True,
        },
    )


def pool(
    conf: RedisSettings,
    *,
    max_connections: int | None = None,
    blocking: bool = False,
    role: Role = "master",
    **overrides: Any,
) -> redis.ConnectionPool:
    """A connection pool to the instance. ``blocking``: callers wait (``POOL_WAIT`` s) for a
    free connection instead of failing when ``max_connections`` are taken. ``overrides``
    replace connection keyword arguments (kombu's transport passes its own connection class
    and options). ``role``: with Sentinel, the master or one of its replicas."""
    kwargs = connection_kwargs(conf) | overrides
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    if blocking:
        kwargs["timeout"] = POOL_WAIT
    if conf.form == "sentinel":
        for key in ("host", "port"):
            kwargs.pop(key, None)
        sentinel_pool = BlockingSentinelConnectionPool if blocking else SentinelConnectionPool
        assert conf.sentinel_master is not None  # checked at validation
        kwargs["is_master"] = role == "master"
        built: redis.ConnectionPool = sentinel_pool(  # type: ignore[no-untyped-call]
            conf.sentinel_master, sentinels(conf), **kwargs
        )
        return built
    if role != "master":
        raise ValueError(f"a {role} client needs a sentinel:// URL, not {conf.describe()}")
    if conf.form == "unix":
        for key in TCP_ONLY:
            kwargs.pop(key, None)
    pool_class = redis.BlockingConnectionPool if blocking else redis.ConnectionPool
    return pool_class(**kwargs)


def client(
    conf: RedisSettings, *, pool_size: int | None = None, role: Role = "master"
) -> redis.Redis:
    """A client of the instance. With ``pool_size``: over a pool of that many connections that
    waits for a free one (up to ``POOL_WAIT`` s) instead of failing with MaxConnectionsError,
    as redis-py's bounded pool would, or opening connections without bound, as its default
    pool does (a worker sizes it to its concurrency, Settings.redis_pool_size). Without: an
    unbounded pool (a producer, the CLI)."""
    built = pool(conf, max_connections=pool_size, blocking=pool_size is not None, role=role)
    return redis.Redis(connection_pool=built)


def kombu_connection_options(conf: RedisSettings) -> dict[str, Any]:
    """Celery settings that put kombu on the instance through OUR transport, whatever the URL
    form: the transport's channels build their pools with ``pool()`` from the
    ``redis_settings`` transport option. ``broker_url`` is for display (kombu parses it, our
    channel does not read it) and never holds a comma-separated sentinel list: kombu would
    take that for fail-over alternates and switch to its stock transport on the first error."""
    url = conf.url
    if conf.form == "sentinel":
        host, port = conf.hosts[0]
        url = f"sentinel://{host}:{port}/{conf.db}"
    elif conf.form == "unix":
        # kombu reads a URL's path as the database and passes ?db=N on to its Connection
        # (TypeError): the socket goes in the host part, quoted.
        url = f"unix://{quote(conf.socket_path or '', safe='')}/{conf.db}"
    return {
        "broker_url": url,
        "broker_transport": TRANSPORT,
        "broker_use_ssl": tls_options(conf) if conf.form == "rediss" else False,
        "broker_transport_options": {
            "redis_settings": conf,
            "socket_timeout": conf.socket_timeout,
            "socket_connect_timeout": conf.connect_timeout,
        },
    }


def tls_verification_failure(exc: BaseException) -> TLSVerificationFailed | None:
    """The TLS verification failure behind a redis-py ConnectionError, if that is its cause."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TLSVerificationFailed):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def server_role(client: Any) -> str:
    """ "master" or "replica", as the server itself says (INFO replication)."""
    role = str(client.info("replication").get("role", "?"))
    return "replica" if role == "slave" else role


def broker_and_state(
    settings: Settings, *, pool_size: int | None = None
) -> tuple[redis.Redis, redis.Redis]:
    """(broker, state): a client of each instance (config/keys.py says what each holds); one
    object twice unless the state has an instance of its own, so a store given both can tell
    whether one Lua script may span them (``broker is state``)."""
    state = client(settings.state_redis, pool_size=pool_size)
    if not settings.separate_state:
        return state, state
    return client(settings.broker_redis, pool_size=pool_size), state
