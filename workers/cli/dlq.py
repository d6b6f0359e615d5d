"""`dlq`: inspect, export, replay and purge the dead-letter store."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.deadletter import DeadLetter
from workers.cli.context import console, context, parse_since
from workers.delivery.ratelimit import GlobalRateLimiter
from workers.stores.deadletter import DeadLetterStore, Replayer


def _matching(
    store: DeadLetterStore, destination: str | None, since: str | None, reason: str | None
) -> Iterator[DeadLetter]:
    """The entries the --destination/--since/--reason filters select, oldest first."""
    start = parse_since(since)
    return store.iter_entries(
        since=start.timestamp() if start else 0.0, destination=destination, reason=reason
    )


@dataclass(frozen=True)
class Selection:
    """Which dead letters a replay or purge acts on: IDs, or the filters, or --all."""

    ids: tuple[str, ...]
    destination: str | None
    since: str | None
    reason: str | None
    select_all: bool

    def entries(self, store: DeadLetterStore) -> list[DeadLetter]:
        if not (self.ids or self.destination or self.since or self.reason or self.select_all):
            raise click.UsageError("choose entries: IDs, --destination, --since, --reason or --all")
        if self.ids:
            found = [store.get(i) for i in self.ids]
            missing = [i for i, e in zip(self.ids, found, strict=True) if e is None]
            if missing:
                click.echo(f"not in the dead-letter store: {', '.join(missing)}", err=True)
            return [e for e in found if e is not None]
        return list(_matching(store, self.destination, self.since, self.reason))


@click.group()
def dlq() -> None:
    """Inspect, replay and purge the dead-letter store."""


_filters = [
    click.option("--destination", "-d", default=None, help="Only this destination."),
    click.option("--since", default=None, help="Dead-lettered since: 90m, 24h, 7d or ISO time."),
    click.option("--reason", default=None, help="Reason contains this text (case-insensitive)."),
]


def _with_filters(func: Any) -> Any:
    for option in reversed(_filters):
        func = option(func)
    return func


def _with_selection(func: Callable[..., None]) -> Callable[..., None]:
    """IDs, the filters and --all, handed to the command as one ``selection``."""

    @functools.wraps(func)
    def command(
        ids: tuple[str, ...],
        destination: str | None,
        since: str | None,
        reason: str | None,
        select_all: bool,
        **options: Any,
    ) -> None:
        func(Selection(ids, destination, since, reason, select_all), **options)

    command = click.option("--all", "select_all", is_flag=True, help="Every entry.")(command)
    return click.argument("ids", nargs=-1)(_with_filters(command))  # type: ignore[no-any-return]


@dlq.command("list")
@_with_filters
@click.option("--limit", default=50, show_default=True, help="Rows to show (newest last).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(
    destination: str | None, since: str | None, reason: str | None, limit: int, as_json: bool
) -> None:
    """List dead letters, with counts by reason."""
    store = context().dead_letters
    entries = list(_matching(store, destination, since, reason))
    if as_json:
        for entry in entries[-limit:]:
            click.echo(entry.model_dump_json(exclude={"envelope", "raw_message"}))
        return
    table = Table(title=f"dead letters: {len(entries)} matching")
    # The id is what `dlq show` and `purge` take: never cut it (a poison message's has 43 chars).
    widest = max((len(entry.delivery_id) for entry in entries[-limit:]), default=0)
    table.add_column("delivery id", no_wrap=True, min_width=widest)
    for column in ("destination", "dead at (UTC)", "status", "attempts", "reason"):
        table.add_column(column)
    for entry in entries[-limit:]:
        attempts = len(entry.envelope.history) if entry.envelope else 0
        table.add_row(
            entry.delivery_id, entry.destination, entry.dead_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(entry.status or "-"), str(attempts), entry.reason[:80],
        )  # fmt: skip
    console.print(table)
    counts = Table(title="by reason")
    counts.add_column("reason")
    counts.add_column("entries", justify="right")
    for category, count in store.counts_by_reason(entries).most_common():
        counts.add_row(category, str(count))
    console.print(counts)


@dlq.command("show")
@click.argument("delivery_id")
def dlq_show(delivery_id: str) -> None:
    """Everything kept about one dead letter: envelope, every attempt, the reason."""
    entry = context().dead_letters.get(delivery_id)
    if entry is None:
        raise click.ClickException(f"{delivery_id}: not in the dead-letter store")
    click.echo(entry.model_dump_json(indent=2))


@dlq.command("export")
@_with_filters
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "json"]),
    default="jsonl",
    show_default=True,
    help='jsonl: one whole entry per line; json: {"data": [...]}.',
)
def dlq_export(destination: str | None, since: str | None, reason: str | None, fmt: str) -> None:
    """Every matching entry, whole (envelope, attempts, raw poison item), oldest first."""
    entries = _matching(context().dead_letters, destination, since, reason)
    if fmt == "jsonl":
        for entry in entries:
            click.echo(entry.model_dump_json())
        return
    click.echo(json.dumps({"data": [entry.model_dump(mode="json") for entry in entries]}))


@dlq.command("replay")
@_with_selection
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
def dlq_replay(selection: Selection, dry_run: bool) -> None:
    """Put dead letters back on their queues, paced by each destination's rate limit.

    Each entry is enqueued and only then removed, in one atomic step, so replaying an entry
    twice (or from two terminals at once) delivers it once."""
    from celery import Celery

    from workers.broker.wire import TaskMessageEncoder

    ctx = context()
    entries = selection.entries(ctx.dead_letters)
    replayer = Replayer(
        ctx.dead_letters,
        ctx.destinations,
        TaskMessageEncoder(Celery("postback_relay", set_as_current=False)),
        GlobalRateLimiter(ctx.redis, ctx.keys),
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("dry run" if dry_run else "replaying", total=len(entries))
        report = replayer.replay(
            entries, dry_run=dry_run, on_progress=lambda _e, _o: progress.advance(task)
        )
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {len(report.replayed)} of {len(entries)} selected")
    if report.already_gone:
        click.echo(f"already replayed or purged meanwhile: {len(report.already_gone)}")
    for delivery_id, why in report.not_replayable.items():
        click.echo(f"not replayable: {delivery_id}: {why}")
    if dry_run:
        for delivery_id in report.replayed:
            click.echo(f"  {delivery_id}")


@dlq.command("purge")
@_with_selection
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(selection: Selection, yes: bool) -> None:
    """Delete dead letters for good."""
    ctx = context()
    entries = selection.entries(ctx.dead_letters)
    if not entries:
        click.echo("nothing to purge")
        return
    if not yes:
        click.confirm(f"Delete {len(entries)} dead letter(s) for good?", abort=True)
    store = ctx.dead_letters
    removed = sum(store.remove(e) for e in entries)
    click.echo(f"purged {removed}")
