"""`postback-relay migrate-keys`: rename an older deployment's Redis keys to hash-tagged ones."""

from __future__ import annotations

import sys

import click

from workers.cli.context import context


@click.command("migrate-keys")
def migrate_keys() -> None:
    """Rename keys written before 0.3 (pr:...) to their hash-tagged names ({pr}:...).

    Run it once before the first worker or producer of the new release starts, and again after
    a rolling upgrade; it is idempotent. Exit 1 when an old key could not be moved because its
    new name already holds data (it is left as it was, and named)."""
    from workers.stores.keymigration import migrate_legacy_keys

    ctx = context()
    report = migrate_legacy_keys(ctx.redis, ctx.keys)
    click.echo(f"renamed {report.renamed} key(s) to {ctx.keys.tag}:...")
    for old in report.conflicts:
        click.echo(f"not moved (the new name already holds data): {old}", err=True)
    if report.conflicts:
        sys.exit(1)
