"""The app for Celery's own commands: `celery -A workers.celery_app inspect active_queues`,
`events`, `purge`, `control`, Flower. Built on first use, from the same environment as the
`postback-relay` commands (settings and the destinations file), never at import time.

It holds no partner secret, so it cannot deliver: a worker started with `celery -A
workers.celery_app worker` refuses to start and names `postback-relay worker`, which reads the
secrets of the queues it consumes and sets the pool, node name and options.

`celery -A` looks the app up as this module's `app` (or `celery`) attribute, which is what makes
the build happen; importing the module alone connects to nothing and reads no file.
"""

from __future__ import annotations

import sys
from functools import cache

import click
from celery.signals import celeryd_init

from workers.app import PostbackRelay


@cache
def _build() -> PostbackRelay:
    from workers.cli.context import EXIT_CONFIG, context

    try:
        app: PostbackRelay = context().start_app()
    except click.ClickException as exc:
        # Celery's CLI would bury a settings error under its own traceback; say it plainly,
        # with the exit code `postback-relay` uses for bad configuration.
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_CONFIG)
    celeryd_init.connect(_refuse_worker, weak=False)
    return app


def _refuse_worker(**_: object) -> None:
    click.echo(
        "Error: this app is for inspect, events, purge, control and Flower; run workers with "
        "`postback-relay worker --queues KIND` (it reads the secrets of the queues it consumes)",
        err=True,
    )
    sys.exit(2)


def __getattr__(name: str) -> PostbackRelay:
    if name in {"app", "celery"}:
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
