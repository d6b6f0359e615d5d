"""The API's routes on FastAPI: POST /v1/events, /healthz, /readyz, and the OpenAPI document at
/openapi.json (the request's schema is ConversionEvent's own). Every answer of /v1/events is
built by ingest.py; here: authentication, the body's size bound, the access line and metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import redis
import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from config.api_clients import ApiClient
from config.destinations import Destinations
from config.keys import RedisKeys
from config.settings import VERSION, Settings
from producers.produce import Producer
from schemas.event import ConversionEvent
from workers import redis_clients
from workers.api.auth import Authenticator
from workers.api.ingest import RETRY_AFTER_UNAVAILABLE, Answer, Ingest, problem
from workers.api.metrics import ApiMetrics
from workers.metrics import MetricsRecorder

log = structlog.get_logger("postback_relay.api")
bearer = HTTPBearer(
    auto_error=False, description="A client's token (POSTBACK_RELAY_API_CLIENTS_FILE)"
)


class ItemResult(BaseModel):
    index: int
    event_id: str | None
    status: Literal["accepted", "duplicate", "invalid"]
    delivery_ids: list[str] = []
    duplicates: list[str] = []
    error: str | None = None
    errors: list[str] = []


class IngestResult(BaseModel):
    """One result per event, in the request's order. 202: every event valid; 422: some were
    not (``status: invalid``, ``error`` naming each field and rule), and the valid ones of the
    same request were enqueued all the same."""

    accepted: int
    duplicates: int
    invalid: int
    results: list[ItemResult]


class Problem(BaseModel):
    error: str


def _request_body_schema(max_items: int) -> dict[str, Any]:
    event = ConversionEvent.model_json_schema()
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        event,
                        {"type": "array", "items": event, "minItems": 1, "maxItems": max_items},
                    ]
                }
            }
        },
    }


def _json(answer: Answer) -> JSONResponse:
    return JSONResponse(answer.body, answer.status, headers=answer.headers)


def create_api(
    settings: Settings, destinations: Destinations, clients: Sequence[ApiClient]
) -> FastAPI:
    """The app, with its producer and clients built once, here (uvicorn serves it)."""
    broker, state = redis_clients.broker_and_state(settings)
    keys = RedisKeys(settings.key_prefix)
    ingest = Ingest(Producer(settings, destinations, state, broker), broker)
    auth = Authenticator(clients, state, keys)
    metrics = ApiMetrics(state, MetricsRecorder(keys))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        metrics.start()
        log.info("api.started", clients=[c.name for c in clients], version=VERSION)
        yield
        metrics.stop()  # after uvicorn let the requests in flight finish
        log.info("api.stopped")

    app = FastAPI(
        title="postback-relay ingest",
        version=VERSION,
        description="Conversion events over HTTP, into the same produce() as the Python helper.",
        lifespan=lifespan,
    )
    problems: dict[int | str, dict[str, Any]] = {
        status: {"model": Problem, "description": text}
        for status, text in {
            400: "The body is not JSON, or neither an event nor an array of events.",
            401: "No bearer token.",
            403: "A token no client has, or events of an app the client may not send for "
            "(then nothing of the request was enqueued).",
            413: "Too many events, or too many bytes, in one request.",
            429: "The client's rate limit: retry after Retry-After seconds.",
            503: "Redis does not answer, or a queue is deeper than its bound: nothing was "
            "enqueued; retry after Retry-After seconds with the same event_id values.",
        }.items()
    }

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=IngestResult,
        responses={
            **problems,
            422: {"model": IngestResult, "description": "Some events are invalid."},
        },
        openapi_extra={"requestBody": _request_body_schema(settings.api_max_items)},
    )
    async def post_events(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> JSONResponse:
        """Enqueue one event, or an array of up to POSTBACK_RELAY_API_MAX_ITEMS events, for
        delivery to every destination whose route takes it. Idempotent by ``event_id``."""
        started = time.perf_counter()
        client = auth.client_for(credentials.credentials) if credentials else None
        if credentials is None:
            answer = problem(401, "send a client's token: Authorization: Bearer <token>")
            answer.headers["WWW-Authenticate"] = "Bearer"
        elif client is None:
            answer = problem(403, "the token is not one of a configured client")
        else:
            body = await _bounded_body(request, settings.api_max_body_bytes)
            if body is None:
                answer = problem(
                    413,
                    f"the body is over {settings.api_max_body_bytes} bytes "
                    "(POSTBACK_RELAY_API_MAX_BODY_BYTES): send the events in several requests",
                )
            else:
                answer = await run_in_threadpool(_accept, client, body)
        seconds = time.perf_counter() - started
        metrics.record(answer.status, answer.outcomes, seconds)
        log.info(
            "api.request",
            method="POST",
            path="/v1/events",
            status=answer.status,
            client=client.name if client else None,
            ms=round(seconds * 1000, 2),
            **{k: v for k, v in answer.outcomes.items() if v},
        )
        return _json(answer)

    def _accept(client: ApiClient, body: bytes) -> Answer:
        try:
            wait = auth.retry_after(client)
        except redis.RedisError:
            return problem(503, "Redis does not answer; retry later", RETRY_AFTER_UNAVAILABLE)
        if wait:
            return problem(429, f"client {client.name!r} is over its rate limit", wait)
        items, refused = ingest.parse_body(body)
        if refused is not None:
            return refused
        assert items is not None
        return ingest.handle(client, items)

    @app.get("/healthz", responses={200: {"description": "The process is up."}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={**problems, 200: {"description": "Redis answers."}})
    async def readyz() -> JSONResponse:
        def ping() -> bool:
            try:
                return bool(state.ping()) and bool(broker.ping())
            except redis.RedisError:
                return False

        if await run_in_threadpool(ping):
            return JSONResponse({"status": "ok", "redis": "ok"})
        return _json(problem(503, "Redis does not answer", RETRY_AFTER_UNAVAILABLE))

    return app


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is over ``limit`` bytes (by its Content-Length, or
    while it is read): an oversized body is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
