"""How the system is doing: `health` (exit 1 saying why, for a healthcheck), `status` (one
screen for on-call) and `metrics` (Prometheus)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

import click
from rich.table import Table

from config.kinds import KINDS
from config.reconcile import RECONCILE_KIND
from workers.broker.keys import queue_list, unacked_queues
from workers.cli.context import CliContext, console, context

HEALTH_CHECKS = ("redis", "consumers", "dead-letters", "paused")


def _kinds_in_use(ctx: CliContext) -> list[str]:
    kinds = {d.kind for d in ctx.destinations}
    if ctx.destinations.reconcile:
        kinds.add(RECONCILE_KIND)
    return sorted(kinds)


def consumers_by_queue(replies: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Queue -> the node name of each worker consuming it, from a broadcast's replies.

    Each reply is one worker, so each is counted. `inspect().active_queues()` merges replies by
    node name (last one wins), so workers that share a name (Celery's default, celery@host, on a
    host that runs several) hid each other's queues and health reported them unconsumed."""
    consumers: dict[str, list[str]] = {}
    for reply in replies:
        for name, queues in reply.items():
            for queue in queues if isinstance(queues, list) else []:  # not an error reply
                consumers.setdefault(queue["name"], []).append(name)
    return consumers


def redis_instances(ctx: CliContext) -> tuple[list[str], list[str]]:
    """(each instance: which, where and the role it reports; what is wrong with them). A
    replica is a problem: it refuses writes, and every process writes."""
    import redis as redis_lib

    from workers.redis_clients import server_role

    notes, problems = [], []
    for which, conf, client in ctx.instances():
        try:
            role = server_role(client)
        except redis_lib.RedisError as exc:
            problems.append(f"redis: {which}: unreachable at {conf.describe()} ({exc})")
            continue
        notes.append(f"redis: {which}: {conf.describe()}, {role}")
        if role != "master":
            problems.append(f"redis: {which}: {conf.describe()} is a {role}, not a master")
    return notes, problems


def _health_problems(
    ctx: CliContext, checks: set[str], kinds: list[str]
) -> tuple[list[str], list[str]]:
    """(what was found, what is wrong)."""
    from config.keys import queue_for

    notes, problems = redis_instances(ctx)
    if problems:
        return notes, problems
    if "consumers" in checks:
        app = ctx.start_app()
        replies = app.control.broadcast("active_queues", reply=True, timeout=2.0)
        consumers = consumers_by_queue(replies)
        for kind in kinds:
            queue = queue_for(kind)
            if consumers.get(queue):
                notes.append(f"consumers: {queue}: {', '.join(sorted(consumers[queue]))}")
            else:
                problems.append(f"consumers: no worker consumes {queue}")
        names = Counter(name for reply in replies for name in reply)
        for name, count in sorted(names.items()):
            if count > 1:
                notes.append(
                    f"WARN consumers: {count} workers answer as {name}; give each its own "
                    "name (worker -n) or Flower and celery inspect show them as one"
                )
    if "dead-letters" in checks:
        count = ctx.dead_letters.count()
        if count > ctx.settings.health_max_dead_letters:
            problems.append(
                f"dead-letters: {count} entries, more than "
                f"POSTBACK_RELAY_HEALTH_MAX_DEAD_LETTERS={ctx.settings.health_max_dead_letters}"
            )
    if "paused" in checks:
        pauses = ctx.pauses
        for dest in ctx.destinations:
            until = pauses.paused_until(dest.name)
            if until is not None:
                problems.append(f"paused: {dest.name} for {until - time.time():.0f}s more")
    return notes, problems


@click.command()
@click.option(
    "--check", "checks", multiple=True, type=click.Choice(HEALTH_CHECKS),
    help="Run only these checks (repeatable; default: all).",
)  # fmt: skip
@click.option(
    "--queue", "queues", multiple=True,
    help="Destination kinds whose queues need a consumer (default: kinds in use).",
)  # fmt: skip
def health(checks: tuple[str, ...], queues: tuple[str, ...]) -> None:
    """Exit 1, saying why, when Redis is unreachable, a queue has no consumer, the dead-letter
    store is over its threshold or a destination is paused. A docker-compose healthcheck.
    Also prints the workers consuming each queue."""
    ctx = context()
    notes, problems = _health_problems(
        ctx, set(checks or HEALTH_CHECKS), list(queues) or _kinds_in_use(ctx)
    )
    for note in notes:
        click.echo(note)
    for problem in problems:
        click.echo(f"FAIL {problem}")
    if problems:
        sys.exit(1)
    click.echo("ok")


@click.command()
def status() -> None:
    """One screen for on-call: the Redis instance(s) and their roles, then per destination its
    queue, delay set, in-flight messages, the last hour's delivered/failed attempts, dead
    letters and pauses."""
    from datetime import UTC, datetime, timedelta

    from config.keys import queue_for

    ctx = context()
    notes, problems = redis_instances(ctx)
    for line in notes + [f"FAIL {problem}" for problem in problems]:
        console.print(line, highlight=False, soft_wrap=True)
    if problems:
        sys.exit(1)
    log = ctx.attempt_log
    hour: Counter[tuple[str, str]] = Counter()
    for record in log.iter_records(datetime.now(UTC) - timedelta(hours=1)):
        hour[(record.get("destination", "?"), record.get("notifying_status", "?"))] += 1
    dead = ctx.dead_letters.counts_by_destination()
    pauses = ctx.pauses
    in_flight = Counter(unacked_queues(ctx.broker_redis))
    table = Table(title=f"postback-relay status at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    for column in ("destination", "kind", "queued", "delayed", "in flight", "sent 1h",
                   "failed 1h", "dead letters", "paused"):  # fmt: skip
        table.add_column(column, justify="left" if column in {"destination", "kind"} else "right")
    for dest in ctx.destinations:
        queue = queue_for(dest.kind)
        until = pauses.paused_until(dest.name)
        table.add_row(
            dest.name, dest.kind, str(ctx.broker_redis.llen(queue_list(queue))),
            str(ctx.broker_redis.zcard(ctx.keys.delayed(queue))), str(in_flight[queue]),
            str(hour[(dest.name, "sent")]), str(hour[(dest.name, "failed")]),
            str(dead.get(dest.name, 0)), f"{until - time.time():.0f}s" if until else "no",
        )  # fmt: skip
    console.print(table)
    size = ctx.settings.batch_size
    carries = f"up to {size} deliveries" if size > 1 else "one delivery"
    console.print(
        "queued/delayed/in flight count messages per kind queue, shared by its destinations; "
        f"a message carries {carries} (POSTBACK_RELAY_BATCH_SIZE={size})"
    )
    console.print(f"deliveries outstanding (ledger: queued, parked or in flight): "
                  f"{ctx.redis.zcard(ctx.keys.ledger())}")  # fmt: skip


@click.command()
@click.option("--port", type=int, default=None, help="Default: POSTBACK_RELAY_METRICS_PORT.")
@click.option("--address", default="0.0.0.0", show_default=True)  # noqa: S104
def metrics(port: int | None, address: str) -> None:
    """Serve Prometheus metrics read from Redis on http://ADDRESS:PORT/metrics."""
    from workers.metrics import RedisStateCollector, serve_metrics

    ctx = context()
    collector = RedisStateCollector(
        ctx.redis, ctx.keys, ctx.destinations, tuple(KINDS), broker=ctx.broker_redis
    )
    server, _thread = serve_metrics(collector, port or ctx.settings.metrics_port, address)
    click.echo(f"serving metrics on http://{address}:{server.server_port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
