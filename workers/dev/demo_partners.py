"""The demo's partners, all in the demo's own process: the local receiver (three templated
partners and the reconciler's redelivery targets), the X sandbox, the XMP sandbox and the
AppMetrica export sandbox; the credentials they and the workers share, made up for this run;
and what each of them received, counted and written to request logs for the demo test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from workers.dev.receiver import Answer, PostbackReceiver, ReceivedRequest
from workers.kinds.redeliver.sandbox import SandboxAppMetrica, export_row
from workers.kinds.x_mact.sandbox import SandboxX, XCredentials
from workers.kinds.xmp.sandbox import SandboxXmp

TEMPLATED = {
    "network-installs": "/installs",
    "network-events": "/events",
    "analytics-flaky": "/flaky",
}
REDELIVERY_PATH = "/pb/"  # where the AppMetrica export's postback URLs point (the receiver)
APPMETRICA_APP = "4242"
FORCED_FAILURES = 3  # deliveries network-events refuses with 400: the demo's dead letters
DESTINATIONS_TEMPLATE = Path(__file__).parent / "demo_destinations.toml"


def _hashed_share(key: str, modulo: int) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % modulo == 0  # noqa: S324


class PartnerAnswers:
    """The receiver's answers. /flaky: 503 to the first two attempts of one delivery in four,
    then 200 (retries succeed: the retry budget is 4). /events: 400 to the first few deliveries
    of one in three (permanent: dead letters); a refused delivery sent again (`dlq replay`) gets
    200, as when a partner fixed its side."""

    def __init__(self) -> None:
        self.flaky: Counter[str] = Counter()
        self.refused: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, request: ReceivedRequest, seen: int) -> Answer:
        key = request.headers.get("X-Idempotency-Key", "")
        with self.lock:
            if request.path == "/flaky" and _hashed_share(key, 4):
                self.flaky[key] += 1
                if self.flaky[key] <= 2:
                    return Answer(503, '{"error":"try later"}')
            if (
                request.path == "/events"
                and key not in self.refused
                and len(self.refused) < FORCED_FAILURES
                and _hashed_share(key, 3)
            ):
                self.refused.add(key)
                return Answer(400, '{"error":"unknown campaign"}')
        return Answer()


def export_rows(receiver_url: str, now: int) -> tuple[list[dict[str, str]], list[str]]:
    """The export: (its rows, the URLs of the postbacks that were never sent). Four postbacks
    failed and were never sent (one failed twice), two failed and were sent later, two were
    sent at once."""
    base = f"{receiver_url}{REDELIVERY_PATH}"
    who = {"device": "6D92078A-8246-4BA4-AE5B-76104861E7DC", "application_id": APPMETRICA_APP}
    never = [f"{base}adnet-{n}?transaction_id=t{n}&event=install" for n in range(1, 5)]
    later = [f"{base}adnet-late?transaction_id=l{n}" for n in range(1, 3)]
    sent = [f"{base}adnet-ok?transaction_id=s{n}" for n in range(1, 3)]
    rows = [export_row(url, "failed", now - 1800 + 60 * i, **who) for i, url in enumerate(never)]
    rows.append(export_row(never[0], "failed", now - 1800, **who))  # its second attempt
    for i, url in enumerate(later):
        rows += [
            export_row(url, "failed", now - 1200 + i, **who),
            export_row(url, "sent", now - 1200 + i, **who),
        ]
    rows += [export_row(url, "sent", now - 900 + i, **who) for i, url in enumerate(sent)]
    return rows, never


@dataclass
class Partners:
    """Every stand-in, started; the environment carrying this run's made-up credentials."""

    receiver: PostbackReceiver
    answers: PartnerAnswers
    x: SandboxX
    xmp: SandboxXmp
    appmetrica: SandboxAppMetrica
    env: dict[str, str]
    never_sent: list[str] = field(default_factory=list)
    x_hashed_ids: set[str] = field(default_factory=set)  # of the devices produced for X

    def expect_x_device(self, device_id: str) -> None:
        """The hashed id X must receive for a device: computed here with the demo's partner
        key, apart from the adapter, so the demo checks what the workers sent."""
        key = base64.b64decode(self.env["DEMO_X_PARTNER_KEY"])
        digest = hmac.new(key, device_id.encode(), hashlib.sha256).digest()
        self.x_hashed_ids.add(base64.b64encode(digest).decode())

    @classmethod
    def start(cls, stack: ExitStack) -> Partners:
        x_creds = XCredentials(*(secrets.token_urlsafe(18) for _ in range(4)))
        env = {
            "DEMO_ANALYTICS_TOKEN": secrets.token_urlsafe(16),
            "DEMO_X_CONSUMER_KEY": x_creds.consumer_key,
            "DEMO_X_CONSUMER_SECRET": x_creds.consumer_secret,
            "DEMO_X_ACCESS_TOKEN": x_creds.access_token,
            "DEMO_X_ACCESS_TOKEN_SECRET": x_creds.access_token_secret,
            "DEMO_X_PARTNER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "DEMO_XMP_TOKEN": secrets.token_urlsafe(16),
            "DEMO_APPMETRICA_TOKEN": secrets.token_urlsafe(16),
        }
        receiver = stack.enter_context(PostbackReceiver())
        answers = PartnerAnswers()
        receiver.responder = answers
        x = stack.enter_context(SandboxX(x_creds, attribution_share=0.4))
        xmp = stack.enter_context(SandboxXmp(token=env["DEMO_XMP_TOKEN"]))
        appmetrica = stack.enter_context(SandboxAppMetrica(token=env["DEMO_APPMETRICA_TOKEN"]))
        rows, never = export_rows(receiver.url, int(time.time()))
        appmetrica.rows = rows
        return cls(receiver, answers, x, xmp, appmetrica, env, never)

    def destinations_toml(self) -> str:
        text = DESTINATIONS_TEMPLATE.read_text()
        for marker, url in (
            ("@BASE@", self.receiver.url),
            ("@X_URL@", self.x.url),
            ("@XMP_URL@", self.xmp.url),
            ("@APPMETRICA_URL@", self.appmetrica.url),
        ):
            text = text.replace(marker, url)
        return text

    # What the stand-ins received, counted.

    def templated(self) -> dict[str, dict[str, int]]:
        out = {name: {"delivered": 0, "refused": 0} for name in TEMPLATED}
        keys: dict[str, set[str]] = {name: set() for name in TEMPLATED}
        by_path = {path: name for name, path in TEMPLATED.items()}
        for req in self.receiver.received():
            name = by_path.get(req.path)
            if name is None:
                continue
            if 200 <= req.status < 300:
                keys[name].add(req.headers.get("X-Idempotency-Key", ""))
            else:
                out[name]["refused"] += 1
        for name, delivered in keys.items():
            out[name]["delivered"] = len(delivered)
        return out

    def x_counts(self) -> dict[str, int]:
        requests = list(self.x.requests)
        accepted = [r for r in requests if r.status == 200]
        return {
            "requests": len(requests),
            "signed": sum(r.status != 401 for r in requests),
            "accepted": len({r.headers.get("X-Idempotency-Key", "") for r in accepted}),
            "device_ids_verified": sum(r.params.get("hashed_device_id") in self.x_hashed_ids
                                       for r in accepted),
            "attributed": sum(bool(r.body.get("data", {}).get("twitter_attribution"))
                              for r in accepted),
        }  # fmt: skip

    def xmp_counts(self) -> dict[str, int]:
        requests = list(self.xmp.requests)
        totals = dict(self.xmp.totals)
        return {
            "requests": len(requests),
            "records_sent": sum(len(body.get("data") or []) for body in requests),
            "daily_records": len(totals),
            "events_counted": sum(int(r.get("event_count", 0)) for r in totals.values()),
        }

    def redelivered_urls(self) -> list[str]:
        return [
            req.raw_target
            for req in self.receiver.received(ok_only=True)
            if req.path.startswith(REDELIVERY_PATH)
        ]

    def write_request_logs(self, directory: Path) -> None:
        """Each stand-in's requests as JSON lines, without the made-up credentials (the XMP
        token travels in its body, X's keys in the Authorization header)."""
        with (directory / "requests-receiver.jsonl").open("w") as out:
            for req in self.receiver.received():
                line = {"path": req.path, "target": req.raw_target, "status": req.status,
                        "key": req.headers.get("X-Idempotency-Key", "")}  # fmt: skip
                out.write(json.dumps(line) + "\n")
        with (directory / "requests-x.jsonl").open("w") as out:
            for xreq in list(self.x.requests):
                data = xreq.body.get("data") or {}
                line = {"path": xreq.path, "status": xreq.status, "params": xreq.params,
                        "key": xreq.headers.get("X-Idempotency-Key", ""),
                        "attributed": bool(data.get("twitter_attribution"))}  # fmt: skip
                out.write(json.dumps(line) + "\n")
        with (directory / "requests-xmp.jsonl").open("w") as out:
            for body in list(self.xmp.requests):
                line = {"records": body.get("data") or []}
                out.write(json.dumps(line, default=str) + "\n")
        with (directory / "requests-appmetrica.jsonl").open("w") as out:
            for params in list(self.appmetrica.requests):
                out.write(json.dumps(params) + "\n")
