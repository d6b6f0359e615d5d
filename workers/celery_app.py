"""The app for Celery's own commands: `celery -A workers.celery_app inspect active_queues`,
`events`, `purge`, `control`, Flower. Built on first use, from the same environment as the
`postback-relay` commands (settings and the destinations file), never at import time.

`celery -A` looks the app up as this module's `app` (or `celery`) attribute, which is what makes
the build happen; importing the module alone connects to nothing and reads no file.
"""

from __future__ import annotations

import sys
from functools import cache

import click

from workers.app import PostbackRelay


@cache
def _build() -> PostbackRelay:
    from workers.cli_support import EXIT_CONFIG, context

    try:
        app: PostbackRelay = context().start_app()
    except click.ClickException as exc:
        # Celery's CLI would bury a settings error under its own traceback; say it plainly,
        # with the exit code `postback-relay` uses for bad configuration.
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_CONFIG)
    return app


def __getattr__(name: str) -> PostbackRelay:
    if name in {"app", "celery"}:
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
