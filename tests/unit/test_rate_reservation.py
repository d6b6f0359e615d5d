"""The rate limiter's reservations (workers/delivery/lua/reserve.lua) against a reference model.

``GcraModel`` is GCRA's virtual-scheduling algorithm written out in Python, with the partner's
announced budget beside it. Hypothesis draws limits, burst tolerances, budgets and arrival
sequences (now and then a batch of several requests at once); the script must hand out the
same send times as the model, and no 1-s window of send times may hold more than the limit
plus the burst. On fakeredis (with Lua) the clock is ours, so arrivals are exactly the drawn
ones; on the suite's real Redis, the arrivals are the instants the script itself reports (its
TIME), which is what the model is then fed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import fakeredis
import limits
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.keys import RedisKeys
from tests.helpers import max_in_any_window
from workers.delivery.ratelimit import GlobalRateLimiter, emission_interval_us

KEYS = RedisKeys("pr")
SECOND_US = 1_000_000
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis directory in the repository
    suppress_health_check=[HealthCheck.too_slow],
)
_names = itertools.count()


@dataclass
class GcraModel:
    """GCRA (virtual scheduling), reservation form: a request arriving at ``now`` is given the
    earliest time at which it conforms, max(now, TAT - tolerance), and the theoretical arrival
    time moves one emission interval past the later of the two. While the partner's budget
    (``remaining`` sends until ``reset_ms``) is spent, a send before the reset waits for it."""

    interval: int  # T, microseconds
    tolerance: int  # tau, microseconds
    tat: int | None = None
    remaining: int | None = None
    reset_ms: int = 0

    def reserve(self, now: int) -> int:
        tat = now if self.tat is None else max(self.tat, now)
        send_at = max(now, tat - self.tolerance)
        ttl_ms = self.reset_ms - now // 1000
        if self.remaining is not None and ttl_ms > 0 and send_at < now + ttl_ms * 1000:
            self.remaining -= 1
            if self.remaining < 0:
                send_at = now + ttl_ms * 1000
        self.tat = max(tat, send_at) + self.interval
        return send_at


def window_bound(interval: int, tolerance: int, width: int = SECOND_US) -> int:
    """GCRA's guarantee: two sends n apart are at least n x T - tau apart, so a window of
    ``width`` holds at most ceil((width + tau) / T) sends."""
    return math.ceil((width + tolerance) / interval)


@contextmanager
def clock_at(start_us: int) -> Iterator[list[int]]:
    """time.time() (fakeredis's TIME and expiry clock) reads the list's one value, in us."""
    now = [start_us]
    with mock.patch("time.time", side_effect=lambda: now[0] / SECOND_US):
        yield now


rates = st.tuples(
    st.integers(min_value=1, max_value=500),  # requests ...
    st.sampled_from([1, 1, 1, 3, 60, 900]),  # ... per this many seconds
    st.integers(min_value=0, max_value=3),  # burst
)


@st.composite
def arrival_gaps(draw: st.DrawFn, interval: int) -> list[int]:
    """Microseconds between arrivals: bunched (0), around the interval, or after quiet spells."""
    gap = st.one_of(
        st.just(0),
        st.integers(min_value=0, max_value=2 * interval),
        st.integers(min_value=0, max_value=3 * SECOND_US),
    )
    return draw(st.lists(gap, min_size=1, max_size=120))


@given(data=st.data(), rate=rates)
@PROPERTY_SETTINGS
def test_reservations_match_the_model_and_no_window_holds_more_than_limit_plus_burst(
    data: st.DataObject, rate: tuple[int, int, int]
) -> None:
    amount, period, burst = rate
    item = limits.parse(f"{amount} per {period} seconds")
    interval = emission_interval_us(item)
    gaps = data.draw(arrival_gaps(interval))
    budget = data.draw(
        st.none() | st.tuples(st.integers(0, 5), st.integers(1, 4 * SECOND_US // 1000))
    )
    server = fakeredis.FakeServer()
    start = 1_764_000_000 * SECOND_US + data.draw(st.integers(0, SECOND_US - 1))
    if budget is not None:
        # Whole milliseconds: fakeredis's PTTL rounds a part-millisecond down where Redis,
        # and the model, round the clock down instead.
        start, gaps = start - start % 1000, [gap - gap % 1000 for gap in gaps]
    with clock_at(start) as now:
        client = fakeredis.FakeRedis(server=server)
        limiter = GlobalRateLimiter(client, KEYS, burst=burst)
        model = GcraModel(interval, interval * burst)
        if budget is not None:
            remaining, reset_in_ms = budget
            model.remaining, model.reset_ms = remaining, start // 1000 + reset_in_ms
            client.set(KEYS.server_budget("net"), remaining, pxat=model.reset_ms)
        sent: list[int] = []
        for gap in gaps:
            now[0] += gap
            # Mostly one at a time (a delivery); now and then a batch's deliveries in one call.
            count = data.draw(st.sampled_from([1, 1, 1, 1, 2, 5]))
            taken = limiter.reserve_many("net", item, count, server_budget=budget is not None)
            assert taken is not None
            expected = [model.reserve(now[0]) for _ in range(count)]
            assert [round(r.send_at * SECOND_US) for r in taken] == expected
            for reservation, at in zip(taken, expected, strict=True):
                assert math.isclose(reservation.wait, (at - now[0]) / SECOND_US, abs_tol=1e-6)
            sent.extend(expected)
    assert sent == sorted(sent)  # first come, first served
    assert max_in_any_window(sent, SECOND_US) <= window_bound(interval, interval * burst)
    if period == 1:
        assert max_in_any_window(sent, SECOND_US) <= amount + burst
    if budget is not None:  # the partner's budget is never overdrawn before its reset
        assert sum(t < model.reset_ms * 1000 for t in sent) <= budget[0]


@given(
    rate=rates,
    gaps_ms=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=25),
)
@settings(max_examples=20, deadline=None, database=None)
def test_reservations_on_a_real_redis_match_the_model_at_the_times_redis_reports(
    redis_url: str, rate: tuple[int, int, int], gaps_ms: list[int]
) -> None:
    amount, period, burst = rate
    item = limits.parse(f"{amount} per {period} seconds")
    interval = emission_interval_us(item)
    client = redis.Redis.from_url(redis_url)
    try:
        limiter = GlobalRateLimiter(client, KEYS, burst=burst)
        key = f"prop-{next(_names)}"
        model = GcraModel(interval, interval * burst)
        sent: list[int] = []
        for gap in gaps_ms:
            time.sleep(gap / 1000)
            reservation = limiter.reserve(key, item)
            assert reservation is not None
            send_at = round(reservation.send_at * SECOND_US)
            at = send_at - round(reservation.wait * SECOND_US)  # Redis's TIME at the call
            assert send_at == model.reserve(at)
            sent.append(send_at)
        assert max_in_any_window(sent, SECOND_US) <= window_bound(interval, interval * burst)
        client.delete(KEYS.rate_limit(key))
    finally:
        client.close()


def test_a_reservation_over_the_callers_max_wait_is_returned_and_not_taken() -> None:
    """The API refuses a request whose slot is not free now (429) and spends nothing of the
    limit on it: the next caller gets the same send time as the refused one was shown."""
    start = 1_764_000_000 * SECOND_US
    item = limits.parse("2 per 10 seconds")
    with clock_at(start) as now:
        limiter = GlobalRateLimiter(fakeredis.FakeRedis(server=fakeredis.FakeServer()), KEYS)
        first = limiter.reserve("api:go", item, max_wait=0)
        assert first is not None
        assert first.wait == 0
        stored = limiter.redis.get(KEYS.rate_limit("api:go"))
        refused = [limiter.reserve("api:go", item, max_wait=0) for _ in range(3)]
        assert [r.wait for r in refused if r] == [5.0, 5.0, 5.0]
        assert limiter.redis.get(KEYS.rate_limit("api:go")) == stored
        taken = limiter.reserve("api:go", item)  # a worker's call: no max wait, taken
        assert taken is not None
        assert taken.wait == 5.0
        assert limiter.redis.get(KEYS.rate_limit("api:go")) != stored
        now[0] += 5 * SECOND_US
        assert limiter.reserve("api:go", item, max_wait=0).wait == 5.0  # type: ignore[union-attr]
