"""The Celery app factory: one app, one queue per destination kind, thin delivery tasks."""

from __future__ import annotations

import time
from typing import Any

import redis
import structlog
from celery import Celery, Task, bootsteps
from celery.exceptions import Reject
from celery.signals import setup_logging
from kombu import Queue

from config.destinations import Destinations, check_timeouts_nest, load_destinations
from config.keys import RedisKeys, queue_for, task_name_for
from config.kinds import KINDS
from config.settings import Settings
from workers import redis_clients
from workers.broker.acks import AckWriting
from workers.broker.consumer import CheckedTask
from workers.broker.events import EventBatching
from workers.broker.internals import check_internals
from workers.broker.transport import Channel, KeepUnreadable
from workers.broker.wire import TaskMessageEncoder
from workers.kinds import kind_tasks
from workers.runtime import WorkerRuntime
from workers.stores.delay import DelaySet
from workers.stores.ledger import DeliveryLedger

log = structlog.get_logger("postback_relay.app")

# Seconds a task waits before it gives back a message it could not run for want of Redis.
REDIS_UNAVAILABLE_PAUSE = 1.0


class PostbackRelay(Celery):
    """A Celery app that also carries the settings and destinations it was built from."""

    settings: Settings
    destinations: Destinations
    runtime: WorkerRuntime


def unacked_mutex_expire(visibility_timeout: int) -> int:
    """Half the visibility timeout, at most kombu's 300 s: a lock left by a dead worker never
    holds messages back for much longer than the timeout they already wait."""
    return max(1, min(300, visibility_timeout // 2))


def create_app(settings: Settings, destinations: Destinations | None = None) -> PostbackRelay:
    """Build the app from settings; the destinations file is validated here, at start-up."""
    if destinations is None:
        destinations = load_destinations(settings.destinations_file)
    check_timeouts_nest(destinations, settings.http_connect_timeout, settings.http_read_timeout)
    # Every task's requests check their arguments before the task runs (workers/broker/consumer.py).
    app = PostbackRelay("postback_relay", set_as_current=False, task_cls=CheckedTask)
    app.settings = settings
    app.destinations = destinations
    app.runtime = WorkerRuntime(settings, destinations, app)
    # Our transport (workers/broker/transport.py) on every URL form, TLS and Sentinel included.
    broker = redis_clients.kombu_connection_options(settings.broker_redis)
    app.conf.update(
        broker_url=broker["broker_url"],
        broker_transport=broker["broker_transport"],
        broker_use_ssl=broker["broker_use_ssl"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # Redis restarts: keep trying, never give up
        broker_transport_options={
            **broker["broker_transport_options"],
            "visibility_timeout": settings.visibility_timeout_seconds,
            # Every task acks through the consumer's channel; kombu's pool of 10 connections
            # failed acks (MaxConnectionsError) under gevent, and each was a duplicate later.
            "max_connections": settings.redis_pool_size,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "health_check_interval": 30,
            # Look for messages of dead workers every 10 s (kombu's default is ~100 s), so
            # they come back soon after the visibility timeout.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # The restore runs under a Redis lock that expires after this. A worker killed
            # while holding it (likely with gevent, whose loop restores on every idle poll)
            # would otherwise block every restore for kombu's 5 minutes; overlapping restores
            # are safe (each is a WATCHed transaction), a stuck lock is not.
            "unacked_mutex_expire": unacked_mutex_expire(settings.visibility_timeout_seconds),
            # Ours (workers/broker/transport.py): where an item kombu cannot decode is kept.
            "on_unreadable_item": KeepUnreadable(app.runtime.keep_unreadable_item),
        },
        broker_heartbeat=0,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        # Every kind has its queue, with or without destinations, so workers, Flower and the
        # compose file agree.
        task_queues=[Queue(queue_for(kind), routing_key=queue_for(kind)) for kind in KINDS],
        task_default_queue=queue_for("templated"),
        task_routes={task_name_for(kind): {"queue": queue_for(kind)} for kind in KINDS},
        worker_prefetch_multiplier=settings.worker_prefetch_multiplier,
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_consumer="workers.broker.consumer:DeadLetteringConsumer",
        enable_utc=True,
        timezone="UTC",
    )
    check_internals(
        app.conf.broker_transport_options,
        Channel.from_transport_options,
        allow_untested_releases=settings.allow_untested_releases,
    )
    for kind in KINDS:
        _register_delivery_task(app, kind)
    _register_periodic_tasks(app)
    app.steps["worker"].add(DelayMover)
    app.steps["consumer"].add(EventBatching)
    app.steps["consumer"].add(AckWriting)
    return app


def _register_delivery_task(app: PostbackRelay, kind: str) -> None:
    @app.task(name=task_name_for(kind), bind=True, queue=queue_for(kind), shared=False)
    def deliver(self: Task[Any, Any], envelope: Any) -> str:
        # A list: a batch of this kind's deliveries. An object: one delivery, the message of
        # every release before batches (and of a batch size of 1). The parameter keeps its
        # old name, so a message passing it by keyword still fits.
        try:
            if isinstance(envelope, list):
                report = app.runtime.deliver_batch(envelope, self.request.id)
                if report.redis_error is not None:
                    raise report.redis_error
                return report.summary()
            result = app.runtime.deliver(envelope, self.request.id)
        except redis.RedisError as exc:
            # Redis is our system of record; without it nothing can be recorded or retried.
            # Requeue the message instead of acking it: at-least-once, never silent loss (a
            # batch's deliveries that were settled are skipped when it comes back).
            log.warning("delivery.redis_unavailable", error=str(exc))
            # With a state instance of its own, the broker takes the message back at once and
            # this worker takes it again: without a pause, one worker of concurrency 4 rejected
            # about 90 messages a second while the state was down (each a log line).
            time.sleep(REDIS_UNAVAILABLE_PAUSE)
            raise Reject(f"redis unavailable: {exc}", requeue=True) from exc
        except Exception as exc:
            # Celery would ack a failed task and the delivery would be gone: keep it instead.
            # (A batch keeps each delivery's unexpected error itself.)
            log.exception("delivery.unexpected_error")
            result = app.runtime.dead_letter_unexpected(envelope, self.request.id, exc)
        return f"{result.status}: {result.detail}"

    deliver.__doc__ = f"Deliver a `{kind}` postback, or a batch of them, concurrently."


def _register_periodic_tasks(app: PostbackRelay) -> None:
    """Periodic work belongs to its kind (workers/kinds/<kind>/tasks.py): beat publishes, any
    worker on the kind's queue runs it, a Redis lock inside keeps it from running twice at once."""
    schedule: dict[str, Any] = {}
    for kind in KINDS:
        module = kind_tasks(kind)
        if module is not None:
            schedule |= module.register(app)
    app.conf.beat_schedule = schedule


class DelayMover(bootsteps.StartStopStep):
    """Every worker republishes due items from the delay set and sweeps the delivery ledger;
    the Lua moves make both safe to run on many workers at once. It builds its own client and
    ledger, not the runtime's: this ledger waits a visibility timeout before it republishes from
    a drained queue, and the step runs in the worker's main process, which (prefork) delivers
    nothing."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None
        self.delays: DelaySet | None = None

    def start(self, worker: Any) -> None:
        app: PostbackRelay = worker.app
        settings, keys = app.settings, RedisKeys(app.settings.key_prefix)
        broker, state = redis_clients.broker_and_state(settings, pool_size=settings.redis_pool_size)
        # Due deliveries of one kind go back in batch messages, as produce_many sends them.
        self.delays = DelaySet(broker, keys, app.settings.batch_size, TaskMessageEncoder(app))
        self.ledger = DeliveryLedger(
            state,
            keys,
            app.settings.ledger_lease_seconds,
            drained_hold_seconds=app.settings.visibility_timeout_seconds,
            broker=broker,
        )
        self.sweep_every = max(1.0, app.settings.ledger_lease_seconds / 10)
        self.last_sweep = 0.0
        self.queues = [queue_for(kind) for kind in KINDS]
        self.tref = worker.timer.call_repeatedly(app.settings.delay_mover_interval, self.move)

    def move(self) -> None:
        assert self.delays is not None
        try:
            self.delays.move_due(self.queues)
            self.ledger.publish_unpublished()  # separate instances only: what the broker missed
            if time.monotonic() - self.last_sweep >= self.sweep_every:
                self.last_sweep = time.monotonic()
                republished = self.ledger.sweep(queues=self.queues)
                if republished:
                    log.warning("ledger.republished", deliveries=republished,
                                reason="no progress within the lease")  # fmt: skip
        except redis.RedisError as exc:
            log.warning("delay_mover.redis_unavailable", error=str(exc))

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


@setup_logging.connect
def _use_structlog(**_: Any) -> None:
    """Keep Celery from installing its own handlers; the CLI configured structlog already."""
