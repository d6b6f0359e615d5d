"""The `redeliver` kind's command: `reconcile`, a reconciler run from the terminal, waiting
for AppMetrica's export with a spinner."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from workers.cli.context import console, context, parse_duration, parse_since

# File section -> the commands here that read this kind's secrets from it (check-config says):
# the AppMetrica token of a [[reconcile]] source, read by the reconciler.
SECRETS_READ_BY = {"reconcile": ("reconcile",)}


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


def register(group: click.Group) -> None:
    group.add_command(reconcile)
