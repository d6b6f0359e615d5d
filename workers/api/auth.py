"""Who is calling: bearer tokens compared in constant time, and each client's rate limit taken
from the workers' own limiter (GCRA in Redis, shared by every API process)."""

from __future__ import annotations

import hmac
import math
from collections.abc import Sequence

import redis

from config.api_clients import ApiClient
from config.keys import RedisKeys
from workers.delivery.ratelimit import GlobalRateLimiter


def limit_key(client: ApiClient) -> str:
    """The limiter key of a client's requests: destination names cannot hold a colon, so no
    destination shares it."""
    return f"api:{client.name}"


class Authenticator:
    def __init__(self, clients: Sequence[ApiClient], state: redis.Redis, keys: RedisKeys) -> None:
        self.clients = list(clients)
        self._tokens = [(c, c.token.get_secret_value().encode()) for c in self.clients]
        # One limiter per limited client: its burst is its limit's amount, so a client quiet
        # for a period may send that many requests at once, and no more over any period.
        self._limiters = {
            c.name: GlobalRateLimiter(state, keys, burst=c.rate_limit.amount - 1)
            for c in self.clients
            if c.rate_limit is not None
        }

    def client_for(self, token: str) -> ApiClient | None:
        """The client whose token this is. Every token is compared, each in constant time, so
        the answer's timing says nothing about which token came close."""
        given = token.encode()
        found = None
        for client, expected in self._tokens:
            if hmac.compare_digest(given, expected):
                found = client
        return found

    def retry_after(self, client: ApiClient) -> int:
        """0 when the client may send this request now (a slot of its limit is taken); else the
        seconds until it may, and nothing is taken (redis.RedisError when Redis is down)."""
        limiter = self._limiters.get(client.name)
        if limiter is None:
            return 0
        reservation = limiter.reserve(limit_key(client), client.rate_limit, max_wait=0)
        assert reservation is not None  # a limit applies
        return math.ceil(reservation.wait) if reservation.wait > 0 else 0
