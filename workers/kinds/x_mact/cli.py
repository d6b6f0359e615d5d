"""The `x_mact` kind's command: `x-check`, which asks X what it would attribute for an event."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from workers.cli.context import context

# File section -> the commands here that read this kind's secrets from it (check-config says).
SECRETS_READ_BY = {"destination": ("x-check",)}


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


def register(group: click.Group) -> None:
    group.add_command(x_check)
