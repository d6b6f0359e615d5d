"""When a request may go: its turn under its destination's rate limit, and no pause.

A delivery's send time is reserved once per attempt (workers/delivery/ratelimit.py). A short
wait is slept where it is; a long one parks it once, with the reservation on its envelope, so it
comes back shortly before its time and sends without asking again. Right before it goes, its
destination's pause is looked at again: another worker's 429 may have come while it waited.
Then it goes only within LATE_GRACE of its time: later, it takes a new one, and after
MAX_LAPSES misses in a row it goes back to its queue rather than out at a time no slot covers
(once per worker process, so a worker that can never wake on time still makes progress).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from schemas.envelope import DeliveryEnvelope
from workers.delivery.ratelimit import GlobalRateLimiter, PauseRegistry
from workers.kinds import DestinationAdapter

log = structlog.get_logger("postback_relay.pipeline")

# How late past its reserved time a parked delivery may still send (seconds). Each late send
# lands beside the sends reserved for now: if every slot of the last 20 ms went late, a 1-s
# window would see 2 % more than the limit. 2 %, not the 5 % the partner's windows may be
# over: arrival jitter (the network, a busy partner) bunches requests too. At 50 ms, the
# rate-limit benchmark's busiest window was 53 at 50/s; at 20 ms, 52.
LATE_GRACE = 0.02
# How many slots in a row a delivery may miss before it goes back to its queue (once per
# process: the next time it is sent late), and how many of those a process remembers.
MAX_LAPSES = 3
SENT_BACK_REMEMBERED = 10_000


def park_lead(max_sleep: float, mover_interval: float) -> float:
    """How long before its reserved time a parked delivery is due back on its queue, to sleep
    the rest there: the delay-set mover runs once an interval, and a queue with a backlog holds
    it up further; back after its time, it would have lost its slot."""
    return max(max_sleep, mover_interval + 0.1)


def takes_send_times(adapter: DestinationAdapter) -> bool:
    """Whether a delivery to ``adapter``'s destination reserves a send time: it makes a request
    of its own (not XMP's totals) under a limit of ours or the partner's announced budget."""
    limited = adapter.destination.rate_limit_item is not None or adapter.uses_server_budget
    return limited and adapter.sends_each_delivery


def reserve_together(
    limiter: GlobalRateLimiter, members: Sequence[tuple[DestinationAdapter, DeliveryEnvelope]]
) -> list[float | None]:
    """A send time for each member (None: it takes none, or it holds one already), one round
    trip per rate-limit key: a batch's deliveries, or produce()'s, ask together."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, (adapter, envelope) in enumerate(members):
        if envelope.reserved_at is None and takes_send_times(adapter):
            group = (adapter.rate_limit_key(envelope), adapter.uses_server_budget)
            groups.setdefault(group, []).append(i)
    times: list[float | None] = [None] * len(members)
    for (limit_key, budget), indexes in groups.items():
        adapter = members[indexes[0]][0]
        taken = limiter.reserve_many(
            limit_key, adapter.destination.rate_limit_item, len(indexes), server_budget=budget
        )
        for i, reservation in zip(indexes, taken or [], strict=False):
            times[i] = reservation.send_at
    return times


@dataclass(frozen=True)
class Held:
    """Not an attempt (the partner never saw it): ``back`` returns to its queue at ``due_at``."""

    detail: str
    back: DeliveryEnvelope
    due_at: float  # epoch seconds


class SendTurns:
    def __init__(
        self,
        limiter: GlobalRateLimiter,
        pauses: PauseRegistry,
        *,
        max_sleep: float,
        mover_interval: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.limiter = limiter
        self.pauses = pauses
        self.clock = clock
        self.max_sleep = max_sleep
        self.park_lead = park_lead(max_sleep, mover_interval)
        # time.sleep as it is when this is built: gevent's under a patched worker.
        self.sleep = sleep if sleep is not None else time.sleep
        # (delivery id, attempt) of deliveries this process sent back for missing their slots.
        self._sent_back: dict[tuple[str, int], None] = {}

    def paused(self, envelope: DeliveryEnvelope, seconds: float) -> Held:
        """Back when the pause ends (its rate-limit slot, if any, is spent)."""
        detail = f"destination paused for {seconds:.1f}s"
        log.info("delivery.deferred", reason=detail)
        return self._back_without_slot(envelope, detail, seconds)

    def _back_without_slot(self, envelope: DeliveryEnvelope, detail: str, after: float) -> Held:
        """Back on its queue ``after`` seconds from now, holding no send time: the one it had
        is spent, and whichever worker takes it next reserves again."""
        back = envelope.model_copy(update={"reserved_at": None})
        return Held(detail, back, self.clock() + after)

    def wait(
        self, adapter: DestinationAdapter, envelope: DeliveryEnvelope, send_at: float | None = None
    ) -> Held | None:
        """None when the request may go now: its rate-limit turn has come (after a short
        sleep) and its destination is not paused. ``send_at``: a time reserved for it with
        its batch (reserve_together)."""
        reserved_at = envelope.reserved_at  # taken when it was parked
        # Back from parking it was due park_lead early: it sleeps that, or parks again only
        # when it came back far too early (a mover whose clock is ahead).
        longest_sleep = self.max_sleep if reserved_at is None else self.park_lead + self.max_sleep
        if reserved_at is None:
            reserved_at = send_at
        for _ in range(MAX_LAPSES):
            if reserved_at is None:
                reservation = self.limiter.reserve(
                    adapter.rate_limit_key(envelope),
                    adapter.destination.rate_limit_item,
                    server_budget=adapter.uses_server_budget,
                )
                if reservation is None:  # no limit: only a pause holds it back
                    return self._unless_paused(adapter, envelope)
                reserved_at = reservation.send_at
            wait = reserved_at - self.limiter.now()
            if wait > longest_sleep:
                # Its slot is taken and kept: it comes back shortly before it.
                back = envelope.model_copy(update={"reserved_at": reserved_at})
                due_at = self.clock() + wait - self.park_lead
                return Held(f"rate limited: sends in {wait:.2f}s", back, due_at)
            if wait > 0:
                self.sleep(wait)
            # The pause is looked at before the lateness, not after: its read (a round trip at
            # most once per PAUSE_VIEW_MAX_AGE) must not come between the check and the send.
            held = self._unless_paused(adapter, envelope)
            if held is not None:
                return held
            late = self.limiter.now() - reserved_at
            if late <= LATE_GRACE:
                return None
            # Its slot went by before it could go (a backlog held it up, or a busy worker woke
            # it late): sent now, it would crowd the slots others hold now. It takes a new one.
            log.info("delivery.reservation_lapsed", late_s=round(late, 3))
            reserved_at, longest_sleep = None, self.max_sleep
        # An overloaded worker missed every slot it took. Sent now, at a time no slot covers,
        # it would push the partner past the limit; it goes back to its queue instead (not an
        # attempt), and whichever worker takes it next reserves again. Once per process: a
        # worker that can never wake on time (and is the only one) would otherwise spend slots
        # on it forever; the second time, it goes late.
        turn = (envelope.delivery_id, envelope.attempt)
        if turn in self._sent_back:
            del self._sent_back[turn]
            log.warning("delivery.sent_late", missed=MAX_LAPSES, reason="sent back once already")
            return None
        self._sent_back[turn] = None
        if len(self._sent_back) > SENT_BACK_REMEMBERED:
            del self._sent_back[next(iter(self._sent_back))]  # the oldest
        detail = f"rate limited: missed its send time {MAX_LAPSES} times (worker overloaded)"
        log.warning("delivery.deferred", reason=detail)
        return self._back_without_slot(envelope, detail, 0.0)

    def _unless_paused(
        self, adapter: DestinationAdapter, envelope: DeliveryEnvelope
    ) -> Held | None:
        paused_until = self.pauses.current(adapter.destination.name)
        if paused_until is None:
            return None
        return self.paused(envelope, paused_until - self.clock())
