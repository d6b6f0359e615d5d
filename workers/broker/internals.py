"""The Celery and kombu internals postback-relay relies on, checked when the app is built.

kombu ignores a transport option it does not know, and a private method whose signature changes
after BRPOP could drop messages with a single log line. So the app refuses to start when the
installed Celery or kombu is not a release series it was tested with, when a private symbol
listed here is missing or has changed its parameters, or when a transport option is not one
kombu's Redis channel reads.

To try a newer release: install it, set ``POSTBACK_RELAY_ALLOW_UNTESTED_RELEASES=1`` (the
symbol and option checks still run), run the whole suite, and when it passes widen
``TESTED_SERIES`` and the pins in pyproject.toml together.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import celery
import kombu
from celery.events.dispatcher import EventDispatcher
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from config.destination_base import ConfigError

# Release series (major.minor) the suite passed with; pyproject.toml pins the same with ~=.
TESTED_SERIES = {"celery": "5.7", "kombu": "5.7"}


@dataclass(frozen=True)
class Internal:
    """One symbol of Celery or kombu's that our code depends on, and how."""

    owner: type
    name: str
    used_by: str
    # The parameter names it must take, in order, after ``self`` (None: an attribute).
    params: tuple[str, ...] | None = None

    @property
    def path(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"

    def problem(self) -> str | None:
        try:
            value = inspect.getattr_static(self.owner, self.name)
        except AttributeError:
            return f"{self.path} is missing (used by {self.used_by})"
        if self.params is None:
            return None
        try:
            found = tuple(inspect.signature(value).parameters)[1:]
        except (TypeError, ValueError):
            return f"{self.path} is no longer a method (used by {self.used_by})"
        if found[: len(self.params)] != self.params:
            return (
                f"{self.path} takes ({', '.join(found)}), not ({', '.join(self.params)}) "
                f"(used by {self.used_by})"
            )
        return None


TRANSPORT, EVENTS, CONSUMER, PUBLISH = (
    f"workers/broker/{name}.py: " for name in ("transport", "events", "consumer", "publish")
)

INTERNALS = (
    Internal(kombu_redis.Channel, "_brpop_read", TRANSPORT + "keeps unreadable items",
             ("options",)),
    Internal(kombu_redis.Channel, "_create_client", TRANSPORT + "one client per channel",
             ("asynchronous",)),
    Internal(kombu_redis.Channel, "client", TRANSPORT + "the BRPOP reply callback"),
    Internal(kombu_redis.Channel, "pool", TRANSPORT + "one client per channel"),
    Internal(kombu_redis.Channel, "_connparams", TRANSPORT + "pools from redis_clients.py",
             ("asynchronous",)),
    Internal(kombu_redis.Channel, "_get_pool", TRANSPORT + "pools from redis_clients.py",
             ("asynchronous",)),
    Internal(kombu_redis.Channel, "connection_class", TRANSPORT + "pools from redis_clients.py"),
    Internal(kombu_redis.Channel, "connection_class_ssl", TRANSPORT + "TLS from redis_clients.py"),
    Internal(kombu_redis.Channel, "keyprefix_fanout", TRANSPORT + "pools from redis_clients.py"),
    Internal(kombu_redis.Channel, "sep", TRANSPORT + "the queue of an unreadable item"),
    Internal(kombu_redis.Channel, "from_transport_options", "workers/app.py: transport options"),
    Internal(kombu_redis.QoS, "restore_unacked_once", TRANSPORT + "restore after a lost "
             "connection", ("stderr",)),
    Internal(kombu_redis.QoS, "restore_by_tag", TRANSPORT + "requeue after a lost "
             "connection", ("tag", "client", "leftmost")),
    Internal(virtual.QoS, "ack", TRANSPORT + "acks held: kombu's bookkeeping alone",
             ("delivery_tag",)),
    Internal(kombu_redis.QoS, "reject", TRANSPORT + "a rejected tag is not written as acked",
             ("delivery_tag", "requeue")),
    Internal(kombu_redis.QoS, "pipe_or_acquire", TRANSPORT + "held acks written together",
             ("pipe", "client")),
    Internal(kombu_redis.QoS, "unacked_key", TRANSPORT + "held acks written together"),
    Internal(kombu_redis.QoS, "unacked_index_key", TRANSPORT + "held acks written together"),
    Internal(kombu_redis.QoS, "visibility_timeout", TRANSPORT + "how long a held ack is kept"),
    Internal(virtual.Transport, "channels", TRANSPORT + "held acks written on a timer"),
    # Our raw publish (publish.py, lua/kombu_publish.lua) writes what _put would: an LPUSH
    # of the JSON message onto _q_for_pri(queue, 0), which is the queue's own name.
    Internal(kombu_redis.Channel, "_put", PUBLISH + "publishes as kombu does",
             ("queue", "message")),
    Internal(kombu_redis.Channel, "_q_for_pri", PUBLISH + "the list of a priority-0 message",
             ("queue", "pri")),
    Internal(kombu_redis.Transport, "brpop_timeout", TRANSPORT + "shutdown within 1 s"),
    Internal(kombu_redis.Transport, "establish_connection", TRANSPORT + "a Sentinel "
             "failover's new master found within a quarter second", ()),
    Internal(virtual.Message, "__init__", TRANSPORT + "non-kombu payloads",
             ("payload", "channel")),
    Internal(EventDispatcher, "__init__", EVENTS + "task events in batches",
             ("connection", "hostname", "enabled", "channel", "buffer_while_offline", "app",
              "serializer", "groups", "delivery_mode", "buffer_group", "buffer_limit",
              "on_send_buffered")),
    Internal(EventDispatcher, "flush", EVENTS + "task events in batches", ()),
    Internal(Request, "__init__", CONSUMER + "arguments checked before a task runs",
             ("message",)),
    Internal(Consumer, "on_decode_error", CONSUMER + "dead-letters undecodable bodies",
             ("message", "exc")),
    Internal(Consumer, "on_unknown_message", CONSUMER + "dead-letters non-tasks",
             ("body", "message")),
    Internal(Consumer, "on_unknown_task", CONSUMER + "dead-letters unknown tasks",
             ("body", "message", "exc")),
    Internal(Consumer, "on_invalid_task", CONSUMER + "dead-letters invalid tasks",
             ("body", "message", "exc")),
)  # fmt: skip


def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


def internals_problems(
    transport_options: Iterable[str],
    known_options: Iterable[str],
    *,
    allow_untested_releases: bool = False,
) -> list[str]:
    """Everything that differs from what postback-relay was tested with; empty when nothing."""
    problems = []
    if not allow_untested_releases:
        for name, module in (("celery", celery), ("kombu", kombu)):
            installed = str(module.__version__)
            if _series(installed) != TESTED_SERIES[name]:
                problems.append(
                    f"{name} {installed} is installed; postback-relay is tested with "
                    f"{name} {TESTED_SERIES[name]}.x"
                )
    problems += [p for p in (i.problem() for i in INTERNALS) if p is not None]
    unknown = sorted(set(transport_options) - set(known_options))
    if unknown:
        problems.append(
            f"transport option(s) {', '.join(unknown)} are not read by kombu's Redis channel "
            "(kombu would ignore them silently)"
        )
    return problems


def check_internals(
    transport_options: Iterable[str],
    known_options: Iterable[str],
    *,
    allow_untested_releases: bool = False,
) -> None:
    """Refuse to start (ConfigError) when Celery or kombu is not what this code was tested with."""
    problems = internals_problems(
        transport_options, known_options, allow_untested_releases=allow_untested_releases
    )
    if problems:
        raise ConfigError(
            "Celery/kombu differ from what postback-relay was tested with:\n  - "
            + "\n  - ".join(problems)
            + "\nInstall the versions pyproject.toml pins, or see workers/broker/internals.py "
            "for how to try a newer release."
        )
