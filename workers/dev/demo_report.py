"""The demo's figures: per destination while it runs, per kind at the end, from what the
partners received (demo_partners), what produce() accepted and what the workers recorded in
Redis (dead letters, the XMP aggregate counter). Tables fit 80 columns."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from config.destinations import Destinations
from config.keys import RedisKeys
from workers.dev.demo_partners import TEMPLATED, Partners
from workers.stores.deadletter import DeadLetterStore


@dataclass
class ReconcileRun:
    """The demo's one `postback-relay reconcile` run, as its table printed it."""

    started_at: float | None = None  # seconds into the demo
    exit_code: int | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, output: str) -> dict[str, int]:
        counts = {}
        for line in output.splitlines():
            cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
            if len(cells) == 2 and cells[1].isdigit():
                counts[cells[0]] = int(cells[1])
        return counts


class Tally:
    def __init__(
        self,
        partners: Partners,
        destinations: Destinations,
        client: redis.Redis,
        keys: RedisKeys,
    ) -> None:
        self.partners = partners
        self.kinds = {dest.name: dest.kind for dest in destinations}
        self.client = client
        self.keys = keys
        self.dead_letters = DeadLetterStore(client, keys)
        self.produced: Counter[str] = Counter()
        self.reconcile = ReconcileRun()
        # A REDIS_URL of the user's may hold an earlier run's figures: count from here.
        self.dead_before = self._dead()
        self.aggregated_before = 0
        self.aggregated_before = self.aggregated()
        self.rows: dict[str, dict[str, int]] = {}
        self.x: dict[str, int] = {}
        self.xmp: dict[str, int] = {}

    def _dead(self) -> Counter[str]:
        return Counter(self.dead_letters.counts_by_destination())

    def aggregated(self) -> int:
        raw = self.client.hget(self.keys.metrics_counters(), "xmp|aggregated")
        return (int(raw) if raw else 0) - self.aggregated_before

    def refresh(self) -> None:
        dead_now = self._dead()
        dead = {name: dead_now[name] - self.dead_before[name] for name in self.kinds}
        templated = self.partners.templated()
        self.x = self.partners.x_counts()
        self.xmp = {**self.partners.xmp_counts(), "aggregated": self.aggregated()}
        redelivered = len(set(self.partners.redelivered_urls()))
        expected = len(self.partners.never_sent)
        for name, kind in self.kinds.items():
            if kind == "templated" and name in TEMPLATED:
                produced = self.produced[name]
                delivered, refused = templated[name]["delivered"], templated[name]["refused"]
            elif kind == "x_mact":
                produced, delivered = self.produced[name], self.x["accepted"]
                refused = self.x["requests"] - sum(
                    1 for r in list(self.partners.x.requests) if r.status == 200
                )
            elif kind == "xmp":
                produced, delivered, refused = self.produced[name], self.xmp["events_counted"], 0
            else:  # redeliver: what the reconciler queued, once it has run
                produced, delivered, refused = expected, redelivered, 0
            pending = max(0, produced - delivered - dead[name])
            self.rows[name] = {"produced": produced, "delivered": delivered,
                               "refused": refused, "dead_lettered": dead[name],
                               "pending": pending}  # fmt: skip

    @property
    def pending(self) -> int:
        return sum(row["pending"] for row in self.rows.values())

    def live(self, title: str) -> Group:
        self.refresh()
        grid = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        grid.add_column("destination", no_wrap=True)
        grid.add_column("kind")
        for column in ("produced", "delivered", "non-2xx", "dead", "pending"):
            grid.add_column(column, justify="right")
        for name, row in self.rows.items():
            grid.add_row(name, self.kinds[name], *(str(row[c]) for c in (
                "produced", "delivered", "refused", "dead_lettered", "pending")))  # fmt: skip
        return Group(grid, Text("\n".join(self.details())))

    def details(self) -> list[str]:
        x, xmp, run = self.x, self.xmp, self.reconcile
        lines = [
            f"X: {x['requests']} requests, {x['signed']} signatures and "
            f"{x['device_ids_verified']} hashed ids verified, {x['attributed']} attributed",
            f"XMP: {xmp['aggregated']} events in {xmp['daily_records']} daily records; "
            f"{xmp['requests']} flushes sent {xmp['records_sent']} records",
        ]
        if run.started_at is None:
            lines.append("reconciler: runs once during the demo")
        elif run.exit_code is None:
            lines.append(f"reconciler: running (started at {run.started_at:.0f}s)")
        else:
            c = run.counts
            lines.append(
                f"reconciler: {c.get('rows read', 0)} export rows, {c.get('postbacks', 0)} "
                f"postbacks, {c.get('already sent', 0)} sent by AppMetrica, "
                f"{c.get('redelivered', 0)} redelivered"
            )
        return lines

    def kinds_summary(self) -> dict[str, dict[str, int]]:
        """Per kind: produced, delivered, attributed/aggregated, redelivered, dead-lettered."""
        self.refresh()
        by_kind: dict[str, Counter[str]] = {}
        for name, row in self.rows.items():
            by_kind.setdefault(self.kinds[name], Counter()).update(row)
        out: dict[str, dict[str, int]] = {
            kind: {k: rows[k] for k in ("produced", "delivered", "dead_lettered", "pending")}
            for kind, rows in by_kind.items()
        }
        out["templated"]["refused"] = by_kind["templated"]["refused"]
        out["x_mact"] |= {
            k: self.x[k] for k in ("requests", "signed", "device_ids_verified", "attributed")
        }
        out["xmp"] |= {"aggregated": self.xmp["aggregated"]} | {
            k: self.xmp[k] for k in ("requests", "records_sent", "daily_records")
        }
        counts = self.reconcile.counts
        out["redeliver"] |= {
            "export_rows": counts.get("rows read", 0),
            "never_sent": len(self.partners.never_sent),
            "redelivered": counts.get("redelivered", 0),
            "reconcile_exit_code": -1 if self.reconcile.exit_code is None
            else self.reconcile.exit_code,
        }  # fmt: skip
        return out

    def summary_table(self) -> Table:
        kinds = self.kinds_summary()
        grid = Table(title="Summary per kind", title_justify="left", box=box.SIMPLE_HEAD,
                     pad_edge=False)  # fmt: skip
        grid.add_column("")
        for kind in ("templated", "x_mact", "xmp", "redeliver"):
            grid.add_column(kind, justify="right")
        x, xmp, red = kinds["x_mact"], kinds["xmp"], kinds["redeliver"]
        rows: list[tuple[str, Any, Any, Any, Any]] = [
            ("produced (redeliver: never sent)", kinds["templated"]["produced"], x["produced"],
             xmp["produced"], red["never_sent"]),
            ("delivered (xmp: daily records)", kinds["templated"]["delivered"], x["delivered"],
             xmp["daily_records"], red["delivered"]),
            ("attributed by X", "-", x["attributed"], "-", "-"),
            ("aggregated into XMP's records", "-", "-", xmp["aggregated"], "-"),
            ("redelivered by the reconciler", "-", "-", "-", red["redelivered"]),
            ("dead-lettered", kinds["templated"]["dead_lettered"], x["dead_lettered"],
             xmp["dead_lettered"], red["dead_lettered"]),
        ]  # fmt: skip
        for label, *cells in rows:
            grid.add_row(label, *(str(c) for c in cells))
        return grid

    def as_json(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            **extra,
            "kinds": self.kinds_summary(),
            "destinations": {
                name: {"kind": self.kinds[name], **row} for name, row in self.rows.items()
            },
            "partners": {
                "x": self.x,
                "xmp": self.xmp,
                "redelivered_urls": sorted(self.partners.redelivered_urls()),
                "never_sent_urls": sorted(self.partners.never_sent),
            },
        }


def dlq_commands(cli: str, redis_url: str, dest_file: str) -> list[str]:
    """The on-call commands to try on the demo's dead letters, with the settings they need."""
    return [
        f"export POSTBACK_RELAY_REDIS_URL={redis_url}",
        f"export POSTBACK_RELAY_DESTINATIONS_FILE={dest_file}",
        f"{cli} dlq list",
        f"{cli} dlq replay --destination network-events",
    ]
