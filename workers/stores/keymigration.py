"""The upgrade of an older deployment's keys, ``pr:...``, to their hash-tagged names, ``{pr}:...``.

Releases before 0.3 wrote every project key under a plain prefix; since then the prefix is a
hash tag (config/keys.py), so dead letters, the ledger, claims and pauses would be stranded
under the old names. Each old key is RENAMEd (RENAMENX: a key the new release already wrote is
never overwritten; that old key stays and is reported). Renaming keeps the value and its
expiry, runs under a lock, and running it again does nothing more: it is safe to repeat after a
rolling upgrade in which old producers still wrote old names. kombu's keys (queues, unacked)
never had our prefix and are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from config.keys import RedisKeys


@dataclass
class KeyMigration:
    renamed: int = 0
    conflicts: list[str] = field(default_factory=list)  # old keys whose new name holds data


def legacy_keys(client: redis.Redis, keys: RedisKeys) -> list[str]:
    """Keys still under the old, untagged prefix (a start-up check can warn about them)."""
    return [k.decode() for k in client.scan_iter(match=f"{keys.legacy_prefix()}*", count=1000)]


def migrate_legacy_keys(
    client: redis.Redis, keys: RedisKeys, lock_wait_seconds: float = 60
) -> KeyMigration:
    """Rename every ``<prefix>:...`` key to ``{<prefix>}:...``; idempotent."""
    report = KeyMigration()
    old_prefix = keys.legacy_prefix()
    with client.lock(keys.lock("migrate-keys"), timeout=600, blocking_timeout=lock_wait_seconds):
        for old in legacy_keys(client, keys):
            new = f"{keys.tag}:{old.removeprefix(old_prefix)}"
            try:
                moved = client.renamenx(old, new)
            except redis.ResponseError:
                continue  # expired since the scan (a dedupe claim, a pause): nothing to move
            if moved:
                report.renamed += 1
            else:
                report.conflicts.append(old)
    return report
