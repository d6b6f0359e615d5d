"""Producers and workers must agree on where the state lives (config/keys.py): a producer that
writes its ledger entries and dedupe claims to the broker while the workers keep theirs on a
state instance delivers, but nothing it produced is in the ledger the workers sweep, so a
message the broker loses is never sent again. Each worker says on the broker, at start-up,
where its state is; a producer reads it once and refuses a shared/separate disagreement.

The key prefix likewise: a producer whose POSTBACK_RELAY_KEY_PREFIX differs from the workers'
writes its ledger and dedupe claims where no worker looks, and a worker takes the members of
its batch messages for settled by an earlier run (its ledger does not hold them) and drops
them. Workers record their prefix in one unprefixed hash per database (the queues are per
database too); a producer whose prefix none of them uses is refused."""

from __future__ import annotations

import contextlib
import time

import redis
import structlog

from config.destination_base import ConfigError
from config.keys import WORKER_KEY_PREFIXES, RedisKeys
from config.settings import Settings

log = structlog.get_logger("postback_relay.state_instance")

SHARED = "the broker's instance"


def where(settings: Settings) -> str:
    """This process's state instance, as announced: its display form (no password)."""
    return settings.state_redis.describe() if settings.separate_state else SHARED


def announce(broker: redis.Redis, keys: RedisKeys, settings: Settings) -> None:
    """A worker starting: record on the broker where the state of its deliveries lives."""
    with broker.pipeline(transaction=False) as pipe:
        pipe.set(keys.state_instance(), where(settings))
        pipe.hset(WORKER_KEY_PREFIXES, keys.prefix, int(time.time()))
        pipe.execute()


def check(broker: redis.Redis, keys: RedisKeys, settings: Settings) -> None:
    """Raise ConfigError when no worker of this broker uses this process's key prefix (but
    some worker has started), or when they keep their state in a separate
    instance and this process would not, or the other way round; log a warning when both
    use a separate one but name it differently (another host name for the same server, or a
    wrong URL). Nothing when no worker has announced yet or the broker cannot be read now
    (produce() still accepts while the broker is down, with a separate state)."""
    with contextlib.suppress(redis.RedisError):
        with broker.pipeline(transaction=False) as pipe:
            pipe.hkeys(WORKER_KEY_PREFIXES)
            pipe.get(keys.state_instance())
            prefixes, raw = pipe.execute()
        theirs_prefixes = sorted(p.decode() if isinstance(p, bytes) else str(p) for p in prefixes)
        if theirs_prefixes and keys.prefix not in theirs_prefixes:
            raise ConfigError(
                f"the workers on this broker use the key prefix "
                f"{' or '.join(map(repr, theirs_prefixes))}, this process {keys.prefix!r}: set "
                "POSTBACK_RELAY_KEY_PREFIX as the workers have it (what this process produced "
                "would be in a ledger no worker reads)"
            )
        if raw is None:
            return
        theirs = raw.decode() if isinstance(raw, bytes) else str(raw)
        ours = where(settings)
        if theirs == ours:
            return
        if SHARED in (theirs, ours):
            raise ConfigError(
                f"the workers on this broker keep their state in {theirs}, this process in "
                f"{ours}: set POSTBACK_RELAY_STATE_REDIS_URL (and the other "
                "POSTBACK_RELAY_STATE_REDIS_* settings) as the workers have them"
            )
        log.warning("state_instance.differs", workers=theirs, this_process=ours)
