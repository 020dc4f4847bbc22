"""Pure ASGI middleware: HTTP metrics, request body limits, and the last line of defence
against crashes.

Pure ASGI rather than BaseHTTPMiddleware, so nothing buffers or re-wraps responses.
"""

from __future__ import annotations

import logging
import time

import prometheus_client
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import INTERNAL_MESSAGE, error_response

log = logging.getLogger(__name__)

REQUESTS = prometheus_client.Counter(
    "loraplex_http_requests_total",
    "HTTP requests answered by the gateway, by route template and status.",
    ["method", "route", "status"],
)
REQUEST_SECONDS = prometheus_client.Histogram(
    "loraplex_http_request_duration_seconds",
    "Time from request to the end of the response, by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
UNMATCHED_ROUTE = "unmatched"


class MetricsMiddleware:
    """Counts and times requests by route template ("/admin/tenants/{tenant}/keys"), never
    by raw path, so label cardinality stays bounded whatever URLs clients send."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router stores the matched route in the scope it was handed (this one).
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            method = scope["method"]
            REQUESTS.labels(method, route, str(status)).inc()
            REQUEST_SECONDS.labels(method, route).observe(time.perf_counter() - start)


class UnhandledErrorMiddleware:
    """Any exception no handler claimed becomes a generic 500 body; the traceback goes to
    the log, never str(err) to the caller."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            if started:  # too late for an error body; the server logs it, drops the connection
                raise
            where = {"method": scope["method"], "path": scope["path"]}
            log.exception("unhandled error", extra=where)
            await error_response(500, INTERNAL_MESSAGE)(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses request bodies over a size limit with 413 and the usual error body: at once
    when Content-Length says so, else as soon as the streamed body passes the limit.

    Not FastAPI's max_body_size: when Content-Length is known, Starlette replaces any 413
    response with its own plain-text one.
    """

    def __init__(self, app: ASGIApp, *, limit: int, prefix_limits: dict[str, int]) -> None:
        self.app = app
        self.limit = limit
        self.prefix_limits = prefix_limits  # e.g. {"/admin/": larger limit for uploads}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = next((n for p, n in self.prefix_limits.items() if path.startswith(p)), self.limit)
        too_large = f"the request body is larger than the limit of {limit} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await error_response(413, too_large)(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # FastAPI re-raises HTTPExceptions from body reading
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, receive_limited, send)
