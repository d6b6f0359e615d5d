"""`attempts`: the attempt log, exported with AppMetrica's postbacks-export field names."""

from __future__ import annotations

import csv
import json
import sys

import click

from schemas.attempts import EXPORT_FIELDS
from workers.cli.context import context, parse_since


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
    log = ctx.attempt_log
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
    log = ctx.attempt_log
    found = [r for r in log.iter_records() if r.get("delivery_id") == delivery_id]
    if not found:
        raise click.ClickException(f"{delivery_id}: no attempts recorded (or aged out)")
    for record in found:
        click.echo(json.dumps(record, indent=2))
