"""On-call commands: the dead-letter store, the attempt log, destination pauses, metrics."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas.deadletter import DeadLetter
from workers.cli.context import CliContext, context, parse_duration, parse_since
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.stores.attempts import AttemptLog
from workers.stores.deadletter import DeadLetterStore, Replayer

console = Console()

EXPORT_FIELDS = (
    "attempt_datetime", "attempt_timestamp", "notifying_status", "response_code",
    "response_body", "postback_url", "postback_method", "conversion_datetime",
    "conversion_timestamp", "event_name", "application_id", "destination", "delivery_id",
    "attempt", "error", "duration_ms", "attribution",
)  # fmt: skip


def _store(ctx: CliContext) -> DeadLetterStore:
    return DeadLetterStore(ctx.redis, ctx.keys)


def _matching(
    store: DeadLetterStore, destination: str | None, since: str | None, reason: str | None
) -> Iterator[DeadLetter]:
    """The entries the --destination/--since/--reason filters select, oldest first."""
    start = parse_since(since)
    return store.iter_entries(
        since=start.timestamp() if start else 0.0, destination=destination, reason=reason
    )


def _select(
    ctx: CliContext,
    *,
    ids: Iterable[str],
    destination: str | None,
    since: str | None,
    reason: str | None,
    select_all: bool,
) -> list[DeadLetter]:
    store = _store(ctx)
    ids = list(ids)
    if not (ids or destination or since or reason or select_all):
        raise click.UsageError("choose entries: IDs, --destination, --since, --reason or --all")
    if ids:
        found = [store.get(i) for i in ids]
        missing = [i for i, e in zip(ids, found, strict=True) if e is None]
        if missing:
            click.echo(f"not in the dead-letter store: {', '.join(missing)}", err=True)
        return [e for e in found if e is not None]
    return list(_matching(store, destination, since, reason))


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


@dlq.command("list")
@_with_filters
@click.option("--limit", default=50, show_default=True, help="Rows to show (newest last).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(
    destination: str | None, since: str | None, reason: str | None, limit: int, as_json: bool
) -> None:
    """List dead letters, with counts by reason."""
    store = _store(context())
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
    entry = _store(context()).get(delivery_id)
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
    entries = _matching(_store(context()), destination, since, reason)
    if fmt == "jsonl":
        for entry in entries:
            click.echo(entry.model_dump_json())
        return
    click.echo(json.dumps({"data": [entry.model_dump(mode="json") for entry in entries]}))


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@_with_filters
@click.option("--all", "select_all", is_flag=True, help="Every entry.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; change nothing.")
def dlq_replay(
    ids: tuple[str, ...],
    destination: str | None,
    since: str | None,
    reason: str | None,
    select_all: bool,
    dry_run: bool,
) -> None:
    """Put dead letters back on their queues, paced by each destination's rate limit.

    Each entry is enqueued and only then removed, in one atomic step, so replaying an entry
    twice (or from two terminals at once) delivers it once."""
    from celery import Celery

    from workers.broker.wire import TaskMessageEncoder

    ctx = context()
    entries = _select(
        ctx, ids=ids, destination=destination, since=since, reason=reason, select_all=select_all
    )
    replayer = Replayer(
        _store(ctx),
        ctx.destinations,
        TaskMessageEncoder(Celery("postback_relay", set_as_current=False)),
        GlobalRateLimiter(ctx.settings.redis_url, ctx.keys),
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
@click.argument("ids", nargs=-1)
@_with_filters
@click.option("--all", "select_all", is_flag=True, help="Every entry.")
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(
    ids: tuple[str, ...],
    destination: str | None,
    since: str | None,
    reason: str | None,
    select_all: bool,
    yes: bool,
) -> None:
    """Delete dead letters for good."""
    ctx = context()
    entries = _select(
        ctx, ids=ids, destination=destination, since=since, reason=reason, select_all=select_all
    )
    if not entries:
        click.echo("nothing to purge")
        return
    if not yes:
        click.confirm(f"Delete {len(entries)} dead letter(s) for good?", abort=True)
    store = _store(ctx)
    removed = sum(store.remove(e) for e in entries)
    click.echo(f"purged {removed}")


@click.group()
def attempts() -> None:
    """The attempt log (AppMetrica postbacks-export field names)."""


@attempts.command("export")
@click.option("--since", default=None, help="90m, 24h, 7d or an ISO time (default: everything).")
@click.option("--destination", "-d", default=None)
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json")
def attempts_export(since: str | None, destination: str | None, fmt: str) -> None:
    """Print attempt records as AppMetrica's export does: {"data": [...]} or CSV."""
    ctx = context()
    log = AttemptLog(ctx.redis, ctx.keys, ctx.settings.attempt_log_max_records)
    records = (
        r for r in log.iter_records(parse_since(since))
        if destination is None or r.get("destination") == destination
    )  # fmt: skip
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=EXPORT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow(record)
        return
    sys.stdout.write('{"data":[')
    for index, record in enumerate(records):
        sys.stdout.write(("," if index else "") + "\n" + json.dumps(record))
    sys.stdout.write("\n]}\n")


@attempts.command("show")
@click.argument("delivery_id")
def attempts_show(delivery_id: str) -> None:
    """Every recorded attempt of one delivery, oldest first."""
    ctx = context()
    log = AttemptLog(ctx.redis, ctx.keys, ctx.settings.attempt_log_max_records)
    found = [r for r in log.iter_records() if r.get("delivery_id") == delivery_id]
    if not found:
        raise click.ClickException(f"{delivery_id}: no attempts recorded (or aged out)")
    for record in found:
        click.echo(json.dumps(record, indent=2))


@click.group()
def destinations() -> None:
    """Destinations: list them with their state, pause and resume them."""


@destinations.command("list")
def destinations_list() -> None:
    ctx = context()
    pauses = PauseRegistry(ctx.redis, ctx.keys)
    counts = _store(ctx).counts_by_destination()
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
    PauseRegistry(ctx.redis, ctx.keys).pause(name, seconds, reason)
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
    lifted = PauseRegistry(ctx.redis, ctx.keys).resume(name)
    kind = ctx.destinations.get(name).kind
    released = DelaySet(ctx.redis, ctx.keys).release(queue_for(kind), name)
    state = "resumed" if lifted else "was not paused"
    click.echo(f"{name}: {state}; {released} held delivery(ies) released")


@click.command()
@click.option("--port", type=int, default=None, help="Default: POSTBACK_RELAY_METRICS_PORT.")
@click.option("--address", default="0.0.0.0", show_default=True)  # noqa: S104
def metrics(port: int | None, address: str) -> None:
    """Serve Prometheus metrics read from Redis on http://ADDRESS:PORT/metrics."""
    from workers.app import ALL_KINDS
    from workers.metrics import RedisStateCollector, serve_metrics

    ctx = context()
    collector = RedisStateCollector(ctx.redis, ctx.keys, ctx.destinations, ALL_KINDS)
    server, _thread = serve_metrics(collector, port or ctx.settings.metrics_port, address)
    click.echo(f"serving metrics on http://{address}:{server.server_port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


@click.command("x-check")
@click.option("--destination", "-d", required=True, help="An x_mact destination.")
@click.argument("event_file", type=click.File("r"), default="-")
def x_check(destination: str, event_file: Any) -> None:
    """Ask X what it would attribute for one event (GET conversion_attribution); records
    nothing, sends no conversion."""
    import requests

    from schemas.errors import InvalidEvent
    from schemas.event import ConversionEvent
    from schemas.outcomes import Skipped
    from workers.delivery.http import http_session
    from workers.kinds.x_mact.adapter import XMactAdapter

    ctx = context()
    dest = ctx.destinations.by_name.get(destination)
    if dest is None or dest.kind != "x_mact":
        raise click.BadParameter(f"{destination!r} is not an x_mact destination")
    dest = ctx.sending(destinations=[destination]).get(destination)
    try:
        event = ConversionEvent.parse(json.load(event_file))
    except (InvalidEvent, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    request = XMactAdapter(dest).build_check_request(event)
    if isinstance(request, Skipped):
        raise click.ClickException(f"not sent: {request.reason}")
    click.echo(f"{request.method} {request.display_url}", err=True)
    try:
        response = http_session(ctx.settings).request(
            request.method, request.url, headers=request.headers,
            timeout=(dest.timeout.connect, dest.timeout.read),
        )  # fmt: skip
    except requests.RequestException as exc:
        raise click.ClickException(f"request failed: {type(exc).__name__}") from None
    click.echo(f"HTTP {response.status_code}", err=True)
    click.echo(response.text)
    if not response.ok:
        sys.exit(1)


@click.group()
def xmp() -> None:
    """XMP aggregates."""


@xmp.command("flush")
@click.option("--destination", "-d", default=None, help="One xmp destination (default: all).")
@click.option("--dry-run", is_flag=True, help="Print what the next flush would send.")
def xmp_flush(destination: str | None, dry_run: bool) -> None:
    """Send the records that changed since their last successful send (or show them)."""
    from config.destinations import XmpDestination
    from workers.kinds.xmp.aggregate import dumps_exact, iter_payloads
    from workers.runtime import WorkerRuntime

    ctx = context()
    names = [d.name for d in ctx.destinations if isinstance(d, XmpDestination)]
    if destination is not None:
        if destination not in names:
            raise click.BadParameter(f"{destination!r} is not an xmp destination")
        names = [destination]
    sending = ctx.sending(destinations=names)
    targets = [d for d in sending if isinstance(d, XmpDestination) and d.name in names]
    runtime = WorkerRuntime(ctx.settings, sending, app=ctx.start_app(sending))
    for dest in targets:
        flusher = runtime.xmp_flusher
        if dry_run:
            records = flusher.pending(dest)
            click.echo(f"{dest.name}: {len(records)} record(s) would be sent")
            for number, batch in enumerate(iter_payloads(dest, records), 1):
                click.echo(f"-- request {number}: {len(batch)} record(s)")
                for record in batch:
                    click.echo(dumps_exact(record).decode())
            continue
        report = flusher.flush(dest)
        click.echo(
            f"{dest.name}: {report.summary()}; batch ids {', '.join(report.batch_ids) or '-'}"
        )


@click.command()
@click.option("--source", "-s", "name", default=None, help="A [[reconcile]] name.")
@click.option("--app", "app_id", default=None, help="...or its AppMetrica application id.")
@click.option("--since", default=None, help="90m, 24h, 7d or ISO time (default: checkpoint).")
@click.option("--until", default=None, help="Default: now minus the settle delay.")
@click.option("--dry-run", is_flag=True, help="Report what would be redelivered; send nothing.")
@click.option(
    "--max-wait",
    default="300s",
    show_default=True,
    callback=lambda _ctx, _param, value: parse_duration(value),
    help="How long to wait for AppMetrica to prepare the export before giving up (exit 1).",
)
def reconcile(
    name: str | None,
    app_id: str | None,
    since: str | None,
    until: str | None,
    dry_run: bool,
    max_wait: float,
) -> None:
    """Find postbacks AppMetrica failed to deliver and never delivered later; redeliver once."""
    from rich.progress import SpinnerColumn

    from workers.kinds.redeliver.reconciler import RunReport
    from workers.runtime import WorkerRuntime

    ctx = context()
    sources = [
        r for r in ctx.destinations.reconcile.values()
        if (name is None or r.name == name) and (app_id is None or r.application_id == app_id)
    ]  # fmt: skip
    if len(sources) != 1:
        known = ", ".join(
            f"{r.name} (app {r.application_id})" for r in ctx.destinations.reconcile.values()
        )
        raise click.UsageError(
            f"choose one source with --source or --app; configured: {known or 'none'}"
        )
    sending = ctx.sending(reconcile=[sources[0].name])
    source = sending.reconcile[sources[0].name]
    runtime = WorkerRuntime(ctx.settings, sending, app=ctx.start_app(sending))
    start, end = parse_since(since), parse_since(until)
    err = Console(stderr=True)
    # A spinner and the time waited on a terminal; one plain line per poll in a log or a pipe.
    spinner = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                       console=err, transient=True, disable=not err.is_terminal)  # fmt: skip

    def show_wait(report: RunReport, polls: int, elapsed: float, wait: float) -> None:
        again = f"asking again in {wait:.0f}s (waiting {max_wait:g}s at most)"
        if spinner.disable:
            click.echo(
                f"reconcile {source.name}: {report.detail}: {polls} poll(s) in {elapsed:.0f}s, "
                + again,
                err=True,
            )
        else:  # the spinner's own column shows the time waited
            spinner.update(task, description=f"{report.detail}: {polls} poll(s), {again}")

    with spinner:
        task = spinner.add_task("asking AppMetrica for the export...")
        report = runtime.reconciler.run_until_ready(
            source, start, end, max_wait=max_wait, dry_run=dry_run, on_wait=show_wait
        )
    window = f"{report.since:%Y-%m-%d %H:%M:%S} to {report.until:%Y-%m-%d %H:%M:%S} UTC"
    if report.state == "timed_out":
        rerun = (
            f"--since {report.since:%Y-%m-%dT%H:%M:%SZ} --until {report.until:%Y-%m-%dT%H:%M:%SZ}"
            if report.explicit
            else "the same options (the pending window is kept)"
        )
        raise click.ClickException(
            f"no export from AppMetrica for {window} within --max-wait {max_wait:g}s "
            f"({report.detail}); run reconcile again later with {rerun} to ask for the same "
            "export"
        )
    title = f"reconcile {source.name}: {window}" + (" (dry run)" if dry_run else "")
    table = Table(title=title)
    table.add_column("")
    table.add_column("count", justify="right")
    for label, value in (
        ("rows read", report.rows_read), ("unparseable rows", report.unparseable),
        ("postbacks", report.postbacks), ("already sent", report.already_sent),
        ("to redeliver", report.to_redeliver),
        ("would redeliver" if dry_run else "redelivered", report.redelivered),
        ("skipped: already redelivered", report.skipped_already_redelivered),
    ):  # fmt: skip
        table.add_row(label, str(value))
    console.print(table)
    for example in report.unparseable_examples:
        click.echo(f"unparseable: {example}", err=True)
    if report.state != "done":
        raise click.ClickException(f"{report.state}: {report.detail}")


HEALTH_CHECKS = ("redis", "consumers", "dead-letters", "paused")


def _kinds_in_use(ctx: CliContext) -> list[str]:
    kinds = {d.kind for d in ctx.destinations}
    if ctx.destinations.reconcile:
        kinds.add("redeliver")
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


def _health_problems(
    ctx: CliContext, checks: set[str], kinds: list[str]
) -> tuple[list[str], list[str]]:
    """(what was found, what is wrong)."""
    import redis as redis_lib

    from config.keys import queue_for

    try:
        ctx.redis.ping()
    except redis_lib.RedisError as exc:
        return [], [f"redis: unreachable at {ctx.settings.redis_url.split('@')[-1]} ({exc})"]
    notes: list[str] = []
    problems = []
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
        count = _store(ctx).count()
        if count > ctx.settings.health_max_dead_letters:
            problems.append(
                f"dead-letters: {count} entries, more than "
                f"POSTBACK_RELAY_HEALTH_MAX_DEAD_LETTERS={ctx.settings.health_max_dead_letters}"
            )
    if "paused" in checks:
        pauses = PauseRegistry(ctx.redis, ctx.keys)
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
    """One screen for on-call: per destination its queue, delay set, in-flight messages,
    the last hour's delivered/failed attempts, dead letters and pauses."""
    from datetime import UTC, datetime, timedelta

    from config.keys import queue_for

    ctx = context()
    log = AttemptLog(ctx.redis, ctx.keys, ctx.settings.attempt_log_max_records)
    hour: Counter[tuple[str, str]] = Counter()
    for record in log.iter_records(datetime.now(UTC) - timedelta(hours=1)):
        hour[(record.get("destination", "?"), record.get("notifying_status", "?"))] += 1
    dead = _store(ctx).counts_by_destination()
    pauses = PauseRegistry(ctx.redis, ctx.keys)
    in_flight = Counter(_unacked_queues(ctx))
    table = Table(title=f"postback-relay status at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    for column in ("destination", "kind", "queued", "delayed", "in flight", "sent 1h",
                   "failed 1h", "dead letters", "paused"):  # fmt: skip
        table.add_column(column, justify="left" if column in {"destination", "kind"} else "right")
    for dest in ctx.destinations:
        queue = queue_for(dest.kind)
        until = pauses.paused_until(dest.name)
        table.add_row(
            dest.name, dest.kind, str(ctx.redis.llen(queue)),
            str(ctx.redis.zcard(ctx.keys.delayed(queue))), str(in_flight[queue]),
            str(hour[(dest.name, "sent")]), str(hour[(dest.name, "failed")]),
            str(dead.get(dest.name, 0)), f"{until - time.time():.0f}s" if until else "no",
        )  # fmt: skip
    console.print(table)
    console.print("queued/delayed/in flight are per kind queue, shared by its destinations")


def _unacked_queues(ctx: CliContext) -> list[str]:
    """The queue of each message a worker holds unacknowledged (kombu's `unacked` hash)."""
    queues = []
    for raw in ctx.redis.hvals("unacked"):
        try:
            queues.append(json.loads(raw)[2])  # [message, exchange, routing_key]
        except (ValueError, IndexError, TypeError):
            continue
    return queues


def register(main: click.Group) -> None:
    for command in (dlq, attempts, destinations, metrics, x_check, xmp, reconcile, health, status):
        main.add_command(command)
