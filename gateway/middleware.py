"""Pure ASGI middleware: HTTP metrics, request body limits (size, read deadline, valid
text), and the last line of defence against crashes.

Pure ASGI rather than BaseHTTPMiddleware, so nothing buffers or re-wraps responses.
"""

from __future__ import annotations

import asyncio
import json
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
    when Content-Length says so, else as soon as the streamed body passes the limit. A body
    that trickles in slower than `read_timeout` per chunk gets 408, so half-sent requests
    cannot hold connections open. A JSON body whose strings are not valid Unicode (a lone
    UTF-16 surrogate escape such as "\\ud800") gets 400: no service could encode it.

    Not FastAPI's max_body_size: when Content-Length is known, Starlette replaces any 413
    response with its own plain-text one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        prefix_limits: dict[str, int],
        read_timeout: float = 30.0,
    ) -> None:
        self.app = app
        self.limit = limit
        self.prefix_limits = prefix_limits  # e.g. {"/admin/": larger limit for uploads}
        self.read_timeout = read_timeout

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
        is_json = "json" in Headers(scope=scope).get("content-type", "")
        chunks: list[bytes] = []
        body_done = False

        async def receive_limited() -> Message:
            nonlocal received, body_done
            if body_done:  # a streaming response waits here for the disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:  # FastAPI re-raises HTTPExceptions from body reading
                raise HTTPException(408, "the request body was not received in time") from None
            body_done = not message.get("more_body", False)
            body = message.get("body", b"")
            received += len(body)
            if received > limit:
                raise HTTPException(413, too_large)
            if is_json:
                chunks.append(body)
                if not message.get("more_body", False) and _has_lone_surrogate(b"".join(chunks)):
                    raise HTTPException(
                        400, "strings must be valid Unicode: the body has a lone surrogate escape"
                    )
            return message

        await self.app(scope, receive_limited, send)


def _has_lone_surrogate(body: bytes) -> bool:
    """Whether a JSON body decodes to a string holding a UTF-16 surrogate. Raw UTF-8 cannot
    carry one, only a \\uD800-\\uDFFF escape can, so bodies without one cost a scan."""
    if b"\\ud" not in body and b"\\uD" not in body:  # JSON's escape is a lowercase \\u
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False  # not JSON: the route's own parsing says so
    pending = [parsed]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if any("\ud800" <= c <= "\udfff" for c in value):
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False
