"""Process settings read once from the environment (prefix ``POSTBACK_RELAY_``)."""

from __future__ import annotations

import math
import os
from importlib.metadata import version
from pathlib import Path
from typing import Literal, get_args

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.redis import RedisConfigError, RedisSettings

ENV_PREFIX = "POSTBACK_RELAY_"
# The one version source is pyproject.toml; the installed package's metadata carries it.
VERSION = version("postback-relay")


WorkerPool = Literal["gevent", "threads", "prefork", "solo"]
WORKER_POOLS: tuple[str, ...] = get_args(WorkerPool)
# Requests in flight per worker process when no concurrency is set. A greenlet costs a few KB,
# a thread about a megabyte of stack, a prefork child a whole process (one per core).
DEFAULT_CONCURRENCY: dict[str, int] = {
    "gevent": 64,
    "threads": 16,
    "prefork": os.cpu_count() or 1,
    "solo": 1,
}
# Seconds added to the derived visibility timeout: the ack's own round trip, kombu's restore
# interval, a slow loop turn.
VISIBILITY_MARGIN = 60
# Redis connections per pool beyond one per concurrent task; see ``Settings.redis_pool_size``.
REDIS_SPARE_CONNECTIONS = 8
# Redis connections per pool that the deliveries of batches share; see ``redis_pool_size``.
MAX_SHARED_CONNECTIONS = 256
# Settings of one Redis instance (config/redis.py): each is ``redis_<field>`` for the broker's
# (and, by default, the state's) and ``state_redis_<field>`` for a separate state instance.
REDIS_FIELDS = tuple(RedisSettings.model_fields)


class Settings(BaseSettings):
    """Everything a producer, worker, beat or CLI process needs, built at start-up.

    ``REDIS_URL`` is accepted as well as ``POSTBACK_RELAY_REDIS_URL`` because most platforms
    (Heroku, Render, compose files) hand the Redis address over under that name.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # The broker's Redis (Celery's queues), and the state's unless STATE_REDIS_URL is set:
    # config/redis.py has the URL forms and the rules.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("POSTBACK_RELAY_REDIS_URL", "REDIS_URL"),
    )
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    redis_tls_verify: bool = True
    redis_socket_timeout: float = Field(default=10.0, gt=0)
    redis_connect_timeout: float = Field(default=5.0, gt=0)
    # A separate state Redis (ledger, dead letters, attempt log, limiter, XMP aggregates);
    # unset: the broker's instance holds the state too (the same settings, the same clients).
    state_redis_url: str | None = None
    state_redis_sentinel_master: str | None = None
    state_redis_sentinel_password: SecretStr | None = None
    state_redis_tls_ca_file: Path | None = None
    state_redis_tls_cert_file: Path | None = None
    state_redis_tls_key_file: Path | None = None
    state_redis_tls_verify: bool = True
    state_redis_socket_timeout: float = Field(default=10.0, gt=0)
    state_redis_connect_timeout: float = Field(default=5.0, gt=0)
    destinations_file: Path = Path("config/destinations.toml")
    data_dir: Path = Path(".postback-relay")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    flower_user: str | None = None
    flower_password: SecretStr | None = None
    flower_port: int = Field(default=5555, ge=1, le=65535)

    # produce(): the same event_id is enqueued once per destination within this window.
    dedupe_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    # produce() returns only once this many replicas acknowledged its write (Redis WAIT), so
    # an accepted event survives a failover; it raises NotReplicated when fewer did within the
    # timeout (workers/broker/replication.py). 0: no waiting (Redis replicates asynchronously).
    produce_wait_replicas: int = Field(default=0, ge=0, le=100)
    produce_wait_timeout_ms: int = Field(default=1000, ge=1, le=60_000)
    # Redis key prefix for everything that is not the Celery broker's own keys.
    key_prefix: str = Field(default="pr", pattern=r"^[a-z][a-z0-9_-]{0,15}$")

    # Worker process model. A delivery mostly waits on the partner: gevent holds many in one
    # process for the least CPU per delivery; see README "Performance" for the figures.
    worker_pool: WorkerPool = "gevent"
    # None: the pool's own default (DEFAULT_CONCURRENCY); see ``concurrency``.
    worker_concurrency: int | None = Field(default=None, ge=1, le=512)
    worker_prefetch_multiplier: int = Field(default=4, ge=1, le=128)

    # Timeouts nest (ARCHITECTURE rule 3): HTTP < soft limit < hard limit < visibility timeout.
    # The longest connect/read timeout any destination may set (checked at start-up).
    http_connect_timeout: float = Field(default=3.05, gt=0)
    http_read_timeout: float = Field(default=10.0, gt=0)
    task_soft_time_limit: float = Field(default=30.0, gt=0)
    task_time_limit: float = Field(default=60.0, gt=0)
    # kombu delivers a message again when it was not acked this long after a worker took it
    # (its worker died). None: derived from the hard limit; see ``visibility_timeout_seconds``.
    visibility_timeout: int | None = Field(default=None, ge=5)
    # A message whose processing started this many times without finishing (its worker died
    # each time) is dead-lettered instead of being redelivered forever.
    max_unfinished_starts: int = Field(default=3, ge=1, le=100)
    delay_mover_interval: float = Field(default=0.5, gt=0, le=10)
    # A delivery whose reserved send time (its destination's rate limit) is at most this far
    # off sleeps in its greenlet; a later one is parked once in the delay set until that time.
    rate_limit_max_sleep: float = Field(default=1.0, ge=0, le=30)
    # The most deliveries of one destination kind a Celery message carries (produce_many and
    # the delay mover group them; a worker sends them concurrently, each with its own ledger
    # entry, idempotency key, attempt record and outcome). 1: one delivery per message, the
    # wire form of releases before 0.4. See README "Performance" for the measured default.
    batch_size: int = Field(default=1, ge=1, le=200)

    # Attempt log retention: the newest N attempt records are kept (a capped Redis stream).
    attempt_log_max_records: int = Field(default=200_000, ge=1000)
    # ... and none older than this.
    attempt_log_max_age_seconds: int = Field(default=30 * 24 * 3600, ge=60)

    # The delivery ledger republishes a delivery that showed no progress (no start, no retry
    # parked, not finished) for this long; None: twice the visibility timeout. Producers and
    # workers must agree on it (and so on the limits it is derived from).
    ledger_lease: int | None = Field(default=None, ge=10)

    # Start with a Celery or kombu release series other than the tested one
    # (workers/broker/internals.py still checks every private symbol and transport option);
    # for trying the next release.
    allow_untested_releases: bool = False

    metrics_port: int = Field(default=9464, ge=1, le=65535)
    # `health` fails when the dead-letter store holds more entries than this.
    health_max_dead_letters: int = Field(default=1000, ge=0)

    # `postback-relay api` (HTTP ingest, workers/api/): its port, the bounds of one request
    # (events, and bytes of body), and the backpressure bound: while a destination queue holds
    # more messages than this, POST /v1/events answers 503 with Retry-After (0: never).
    api_port: int = Field(default=8080, ge=1, le=65535)
    api_max_items: int = Field(default=500, ge=1, le=10_000)
    api_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    api_max_queue_depth: int = Field(default=100_000, ge=0)
    # The API's clients: each one's bearer token by reference to an environment variable or a
    # file, its apps and rate limit (config/api_clients.py; unset: every request is refused, 401).
    api_clients_file: Path | None = None

    http_user_agent: str = f"postback-relay/{VERSION} (+https://github.com/postback-relay)"

    @property
    def visibility_timeout_seconds(self) -> int:
        """The setting, or long enough for the last prefetched message to be acked: a worker
        holds concurrency x prefetch multiplier messages, so one may wait for (multiplier - 1)
        rounds of tasks at the hard limit before its own starts, then run up to the limit;
        plus a minute. 4 x 60 s + 60 s = 300 s by default, so a dead worker's messages come
        back within minutes (nothing waits in a countdown that would need longer)."""
        if self.visibility_timeout is not None:
            return self.visibility_timeout
        derived = self.worker_prefetch_multiplier * self.task_time_limit + VISIBILITY_MARGIN
        return math.ceil(derived)

    @property
    def ledger_lease_seconds(self) -> int:
        """Twice the visibility timeout by default: kombu's own restore of a dead worker's
        messages comes first; the ledger only catches what kombu lost (600 s by default)."""
        return self.ledger_lease or 2 * self.visibility_timeout_seconds

    @property
    def broker_redis(self) -> RedisSettings:
        """The broker's Redis instance (Celery's queues, kombu's unacked messages)."""
        return self._redis_instance("redis_")

    @property
    def state_redis(self) -> RedisSettings:
        """The state's Redis instance: the broker's settings unless STATE_REDIS_URL is set
        (``separate_state``), and then a process uses one client for both."""
        if self.state_redis_url is None:
            return self.broker_redis
        return self._redis_instance("state_redis_")

    @property
    def separate_state(self) -> bool:
        return self.state_redis_url is not None

    def _redis_instance(self, prefix: str) -> RedisSettings:
        values = {field: getattr(self, prefix + field) for field in REDIS_FIELDS}
        context = {"env_prefix": (ENV_PREFIX + prefix).upper()}
        return RedisSettings.model_validate(values, context=context)

    @model_validator(mode="after")
    def _redis_instances_valid(self) -> Settings:
        """Both instances are checked here, at start-up (properties build them again later:
        model_copy() does not run validators)."""
        self.broker_redis  # noqa: B018 - raises RedisConfigError naming the variable
        if self.state_redis_url is None:
            orphans = sorted(
                f"{ENV_PREFIX}{name.upper()}"
                for name, field in type(self).model_fields.items()
                if name.startswith("state_redis_") and getattr(self, name) != field.default
            )
            if orphans:
                raise RedisConfigError(
                    f"{', '.join(orphans)}: only read with {ENV_PREFIX}STATE_REDIS_URL set "
                    "(without it the state instance is the broker's)"
                )
        else:
            self.state_redis  # noqa: B018
        return self

    @model_validator(mode="after")
    def _timeouts_nest(self) -> Settings:
        http_total = self.http_connect_timeout + self.http_read_timeout
        visibility = self.visibility_timeout_seconds
        if not http_total < self.task_soft_time_limit < self.task_time_limit < visibility:
            raise ValueError(
                "timeouts must nest: http_connect_timeout + http_read_timeout "
                f"({http_total:g}) < task_soft_time_limit ({self.task_soft_time_limit:g}) "
                f"< task_time_limit ({self.task_time_limit:g}) "
                f"< visibility_timeout ({visibility})"
            )
        if (self.flower_user is None) != (self.flower_password is None):
            raise ValueError("flower_user and flower_password must be set together")
        return self

    @property
    def concurrency(self) -> int:
        """Tasks (messages) a worker process runs at once: the setting, or its pool's default.
        With batches, the same number of tasks: a batch holds its task until its slowest
        delivery is done, so fewer tasks would let one slow answer idle a whole worker."""
        return self.worker_concurrency or DEFAULT_CONCURRENCY[self.worker_pool]

    @property
    def deliveries_in_flight(self) -> int:
        """The most deliveries a worker process sends at once: each task's whole batch (the
        HTTP connection pool's size)."""
        return self.concurrency * self.batch_size

    @property
    def redis_pool_size(self) -> int:
        """Connections each Redis connection pool of a process may hold: one per task or
        delivery running at once (each acks, records and requeues through the pool), plus
        spares for the consumer, its timers and the delay mover. kombu's own default of 10
        failed acks with MaxConnectionsError at gevent's concurrency of 64, and a failed ack is
        a duplicate. With batches, at most 256 (or one per task): a delivery holds a connection
        for one short command at a time, and the pool makes the others wait, not fail."""
        shared = min(self.deliveries_in_flight, max(self.concurrency, MAX_SHARED_CONNECTIONS))
        return shared + REDIS_SPARE_CONNECTIONS
