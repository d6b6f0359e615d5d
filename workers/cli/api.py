"""`postback-relay api`: HTTP ingest (workers/api/) on uvicorn, one process; SIGTERM lets the
requests in flight finish, then stops."""

from __future__ import annotations

import sys

import click

from config.api_clients import load_api_clients
from config.destination_base import ConfigError
from workers.cli.context import EXIT_CONFIG, context

# Seconds uvicorn waits for requests in flight after SIGTERM (compose gives 75 s).
GRACEFUL_SHUTDOWN = 30


@click.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")  # noqa: S104
@click.option("--port", type=int, default=None, help="Default: POSTBACK_RELAY_API_PORT (8080).")
def api(host: str, port: int | None) -> None:
    """Serve POST /v1/events (HTTP ingest into produce()), /healthz, /readyz, /openapi.json."""
    import structlog
    import uvicorn

    from workers.api.app import create_api
    from workers.logging import configure_logging

    ctx = context()
    settings = ctx.settings
    try:
        clients = load_api_clients(settings.api_clients_file)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    configure_logging(settings, [c.token.get_secret_value() for c in clients])
    ctx.refuse_unverified_tls()
    if not clients:
        structlog.get_logger("postback_relay.api").warning(
            "api.no_clients",
            detail="POSTBACK_RELAY_API_CLIENTS_FILE is unset: every request is refused (401)",
        )
    try:
        app = create_api(settings, ctx.destinations, clients)
    except ConfigError as exc:  # its producer disagrees with the workers on the state instance
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    config = uvicorn.Config(
        app,
        host=host,
        port=port or settings.api_port,
        log_config=None,  # uvicorn's own lines go through our structlog handler
        access_log=False,  # ours (api.request) has the client's name and no query or body
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        server_header=False,
    )
    uvicorn.Server(config).run()
