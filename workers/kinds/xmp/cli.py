"""The `xmp` kind's commands: `xmp flush`, to send (or show) the aggregates now."""

from __future__ import annotations

import click

from workers.cli.context import context

# File section -> the commands here that read this kind's secrets from it (check-config says).
SECRETS_READ_BY = {"destination": ("xmp flush",)}


@click.group()
def xmp() -> None:
    """XMP aggregates."""


@xmp.command("flush")
@click.option("--destination", "-d", default=None, help="One xmp destination (default: all).")
@click.option("--dry-run", is_flag=True, help="Print what the next flush would send.")
def xmp_flush(destination: str | None, dry_run: bool) -> None:
    """Send the records that changed since their last successful send (or show them)."""
    from config.kinds.xmp import XmpDestination
    from workers.kinds.xmp.adapter import dumps_exact, iter_payloads
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


def register(group: click.Group) -> None:
    group.add_command(xmp)
