"""`destinations`: list the destinations with their state, pause and resume them."""

from __future__ import annotations

import time

import click
from rich.table import Table

from workers.cli.context import console, context


@click.group()
def destinations() -> None:
    """Destinations: list them with their state, pause and resume them."""


@destinations.command("list")
def destinations_list() -> None:
    ctx = context()
    pauses = ctx.pauses
    counts = ctx.dead_letters.counts_by_destination()
    table = Table()
    for column in ("name", "kind", "rate limit", "paused", "dead letters"):
        table.add_column(column)
    for dest in ctx.destinations:
        until = pauses.paused_until(dest.name)
        paused = f"{until - time.time():.0f}s more" if until else "no"
        table.add_row(dest.name, dest.kind, dest.rate_limit or "-", paused,
                      str(counts.get(dest.name, 0)))  # fmt: skip
    console.print(table)


@destinations.command("pause")
@click.argument("name")
@click.option("--for", "seconds", type=float, default=3600, show_default=True)
@click.option("--reason", default="paused by an operator")
def destinations_pause(name: str, seconds: float, reason: str) -> None:
    """Hold every delivery to NAME (they wait, no attempt is spent)."""
    ctx = context()
    if name not in ctx.destinations.by_name:
        raise click.BadParameter(f"{name!r} is not in {ctx.destinations.source}")
    ctx.pauses.pause(name, seconds, reason)
    click.echo(f"{name}: paused for {seconds:g}s")


@destinations.command("resume")
@click.argument("name")
def destinations_resume(name: str) -> None:
    """Lift a pause (set by an operator, a 429 Retry-After or a 401)."""
    from config.keys import queue_for
    from workers.stores.delay import DelaySet

    ctx = context()
    if name not in ctx.destinations.by_name:
        raise click.BadParameter(f"{name!r} is not in {ctx.destinations.source}")
    lifted = ctx.pauses.resume(name)
    kind = ctx.destinations.get(name).kind
    released = DelaySet(ctx.broker_redis, ctx.keys).release(queue_for(kind), name)
    state = "resumed" if lifted else "was not paused"
    click.echo(f"{name}: {state}; {released} held delivery(ies) released")
