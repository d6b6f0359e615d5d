"""The `postback-relay` command: parses, configures logging, calls library code. Exit codes:
0 ok, 1 failure at run time, 2 bad configuration or usage.

Here: the group, the commands that run the system (worker, beat, flower, produce, demo) and
check-config. The on-call commands are in this package by group (dlq, attempts, destinations,
health); a kind's own commands are in its folder (workers/kinds/<kind>/cli.py), registered below
for every kind of config/kinds."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from config.api_clients import load_api_clients
from config.destination_base import ConfigError, SecretUse
from config.keys import queue_for
from config.kinds import KINDS
from config.settings import WORKER_POOLS
from workers.cli.api import api
from workers.cli.attempts import attempts
from workers.cli.context import EXIT_CONFIG, context
from workers.cli.destinations import destinations
from workers.cli.dlq import dlq
from workers.cli.health import health, metrics, status
from workers.cli.keys import migrate_keys
from workers.kinds import kind_commands

# Each kind's own commands, from its folder: they are registered on the group below.
KIND_COMMANDS = {kind: module for kind in KINDS if (module := kind_commands(kind)) is not None}
# (kind, file section) -> besides the workers of the kind, the commands that read its secrets.
SENDING_COMMANDS: dict[tuple[str, str], tuple[str, ...]] = {
    (kind, section): commands
    for kind, module in KIND_COMMANDS.items()
    for section, commands in module.SECRETS_READ_BY.items()
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="postback-relay")
def main() -> None:
    """Postback delivery: produce() -> Redis -> Celery workers -> ad networks."""


@main.command("check-config")
def check_config() -> None:
    """Validate settings and the destinations file, list the destinations, and read every
    secret, saying which processes need it (exit 2 when one cannot be read)."""
    ctx = context()
    destinations = ctx.destinations
    click.echo(f"{destinations.source}: {len(destinations)} destination(s) OK")
    for dest in destinations:
        routes = ", ".join(
            r.type + (f"[{','.join(r.events)}]" if r.events else "")
            for r in dest.routes
            if r.active
        )
        click.echo(
            f"  {dest.name:<24} kind={dest.kind:<10} rate_limit={dest.rate_limit or '-'}"
            f"  retries={dest.retry.max_attempts}  routes: {routes or '(none active)'}"
        )
    _check_api_clients(ctx.settings.api_clients_file)
    uses = destinations.secret_uses()
    if not uses:
        return
    click.echo(
        "secrets (each read only by the processes named, a worker without --queues reads all; "
        "producers, beat and Flower read none):"
    )
    problems = []
    for use in uses:
        try:
            use.read(os.environ)
            state = "ok"
        except ConfigError as exc:
            problems.append(f"{destinations.source}: {exc}")
            state = "FAIL"
        click.echo(
            f"  {state:<7}  {use.owner} {use.field} ({use.ref.describe()}), "
            f"needed by: {', '.join(_needed_by(use))}"
        )
    for problem in problems:
        click.echo(f"Error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_CONFIG)


def _check_api_clients(path: Path | None) -> None:
    """The API's clients file, its tokens read (needed by `api` only); exit 2 when it fails."""
    if path is None:
        return
    try:
        clients = load_api_clients(path)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"{path}: {len(clients)} API client(s) OK, tokens read (needed by: api)")
    for client in clients:
        apps = ", ".join(sorted(client.app_ids)) if client.app_ids is not None else "every app"
        click.echo(f"  {client.name:<24} apps: {apps}  rate_limit={client.rate_limit or '-'}")


def _needed_by(use: SecretUse) -> list[str]:
    commands = SENDING_COMMANDS.get((use.kind, use.section), ())
    return [f"worker --queues {use.kind}", *commands]


@main.command()
@click.option(
    "--queues",
    "-Q",
    default=None,
    help="Comma-separated destination kinds to consume (default: every kind).",
)
@click.option("--pool", "-P", type=click.Choice(WORKER_POOLS), default=None)
@click.option("--concurrency", "-c", type=int, default=None)
@click.option(
    "--hostname",
    "-n",
    default=None,
    help="Worker node name, as celery -n (%h expands to the host). "
    "Default: KINDS-PID@%h, e.g. templated-4242@%h.",
)
def worker(
    queues: str | None, pool: str | None, concurrency: int | None, hostname: str | None
) -> None:
    """Run a delivery worker (a Celery worker on the destination queues)."""
    kinds = queues.split(",") if queues else list(KINDS)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise click.BadParameter(f"unknown kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")
    hostname = hostname or default_node_name(kinds if queues else None)
    ctx = context()
    # Options win over the environment, and the process is built from what will really run
    # (the HTTP pool is sized to the concurrency).
    overrides = {"worker_pool": pool, "worker_concurrency": concurrency}
    ctx.settings = ctx.settings.model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    settings = ctx.settings
    from workers.delivery.batch import gevent_patched
    from workers.fdlimit import ensure_descriptors

    too_few = ensure_descriptors(settings)  # before the re-exec: the limit carries over
    if too_few is not None:
        click.echo(f"Error: {too_few}", err=True)
        sys.exit(EXIT_CONFIG)

    if settings.worker_pool == "gevent" and not gevent_patched():
        # gevent must patch the standard library before anything imports it: start over, in
        # this same process, through the module that patches first.
        argv = ["worker", "--pool", "gevent", "-c", str(settings.concurrency), "-n", hostname]
        argv += ["--queues", queues] if queues else []
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "workers.gevent_worker", *argv])  # noqa: S606
    app = ctx.start_app(ctx.sending(kinds=kinds))
    from workers import state_instance

    state_instance.announce(ctx.broker_redis, ctx.keys, settings)
    argv = [
        "worker",
        "--queues",
        ",".join(queue_for(k) for k in kinds),
        "--pool",
        settings.worker_pool,
        "--concurrency",
        str(settings.concurrency),
        "--loglevel",
        settings.log_level,
        "--hostname",
        hostname,
        "--without-mingle",
        "--without-gossip",
        "-E",
    ]
    app.worker_main(argv)


def default_node_name(kinds: list[str] | None) -> str:
    """What the worker serves and its PID, on this host: `templated-4242@%h`, `x_mact+xmp-4243@%h`,
    `all-4244@%h`. Celery's own default, `celery@%h`, is the same for every worker on a host
    (a Procfile, one VM), and Celery's replies, Flower and `health` merge workers that share a
    name. The PID makes two workers on the same queues differ without any coordination, and
    stays the same through the gevent re-exec (execv keeps it). Commas would split the name in
    `celery inspect -d`, hence `+`."""
    return f"{'+'.join(kinds) if kinds else 'all'}-{os.getpid()}@%h"


@main.command()
@click.option("--port", type=int, default=None, help="Default: POSTBACK_RELAY_FLOWER_PORT or 5555.")
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option(
    "--open-localhost",
    is_flag=True,
    help="Run without basic auth. Only allowed when listening on 127.0.0.1.",
)
def flower(port: int | None, address: str, open_localhost: bool) -> None:
    """Run Flower against the app, with basic auth from settings."""
    ctx = context()
    settings = ctx.settings
    app = ctx.start_app()
    if settings.flower_user and settings.flower_password:
        os.environ["FLOWER_BASIC_AUTH"] = (
            f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"
        )
    elif not (open_localhost and address == "127.0.0.1"):
        raise click.UsageError(
            "Flower needs credentials: set POSTBACK_RELAY_FLOWER_USER and "
            "POSTBACK_RELAY_FLOWER_PASSWORD, or pass --open-localhost with --address 127.0.0.1"
        )
    app.start(["flower", f"--port={port or settings.flower_port}", f"--address={address}"])


@main.command()
def beat() -> None:
    """Run the single periodic scheduler."""
    ctx = context()
    settings = ctx.settings
    app = ctx.start_app()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(
        [
            "beat",
            "--loglevel",
            settings.log_level,
            "--schedule",
            str(settings.data_dir / "celerybeat-schedule"),
        ]
    )


def _json_lines(stream: Any) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(stream, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise click.ClickException(f"line {number}: not JSON ({exc.msg})") from None


@main.command()
@click.argument("source", type=click.File("r"), default="-")
def produce(source: Any) -> None:
    """Produce events from JSON lines (a file or stdin); print one result line per event."""
    from producers.produce import Producer

    ctx = context()
    producer = Producer(ctx.settings, ctx.destinations, ctx.redis, ctx.broker_redis)
    failed = 0
    for result in producer.produce_many(_json_lines(source)):
        failed += not result.ok
        click.echo(
            json.dumps(
                {
                    "event_id": result.event_id,
                    "accepted": result.accepted,
                    "duplicates": result.duplicates,
                    "error": result.error,
                }
            )
        )
    sys.exit(1 if failed else 0)


@main.command()
@click.option(
    "--duration",
    type=float,
    default=20.0,
    show_default=True,
    help="Seconds to produce events for; Ctrl-C stops earlier.",
)
@click.option("--rate", type=float, default=20.0, show_default=True, help="Events per second.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the embedded Redis keeps its AOF (default: POSTBACK_RELAY_DATA_DIR/demo).",
)
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option(
    "--keep-running",
    is_flag=True,
    help="After the summary, keep Redis and the processes up (try `dlq list`) until Ctrl-C.",
)
@click.option(
    "--summary-json",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the summary's figures, per kind and per destination, to this file.",
)
def demo(
    duration: float,
    rate: float,
    data_dir: Path | None,
    no_flower: bool,
    keep_running: bool,
    summary_json: Path | None,
) -> None:
    """Run everything locally (embedded Redis unless REDIS_URL is set) and show deliveries."""
    from workers.dev.demo import run_demo

    settings = context().settings
    sys.exit(
        run_demo(
            settings,
            duration=duration,
            rate=rate,
            data_dir=data_dir or settings.data_dir / "demo",
            flower=not no_flower,
            keep_running=keep_running,
            summary_json=summary_json,
        )
    )


for command in (dlq, attempts, destinations, health, status, metrics, migrate_keys, api):
    main.add_command(command)
for module in KIND_COMMANDS.values():
    module.register(main)

if __name__ == "__main__":
    main()
