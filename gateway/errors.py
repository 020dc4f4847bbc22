"""gRPC status -> HTTP status, and the one error body every failure is sent with (AIP-193):

    {"error": {"code": 404, "status": "NOT_FOUND", "message": "...", "details": [...]}}

details carries the google.rpc.ErrorInfo (reason, domain, metadata) that the services'
interceptor puts in the `grpc-status-details-bin` trailer, in its proto JSON form.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.protobuf import any_pb2, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status.rpc_status import GRPC_DETAILS_METADATA_KEY
from starlette.exceptions import HTTPException

from services.common.errors import (
    ERROR_DOMAIN,
    REDIS_OUTAGE,
    LoraplexError,
    OutageLog,
    domain_error,
)

log = logging.getLogger(__name__)

_C = grpc.StatusCode
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    _C.INVALID_ARGUMENT: 400,
    _C.OUT_OF_RANGE: 400,
    _C.FAILED_PRECONDITION: 400,
    _C.UNAUTHENTICATED: 401,
    _C.PERMISSION_DENIED: 403,
    _C.NOT_FOUND: 404,
    _C.ALREADY_EXISTS: 409,
    _C.ABORTED: 409,
    _C.RESOURCE_EXHAUSTED: 429,
    _C.CANCELLED: 499,
    _C.UNIMPLEMENTED: 501,
    _C.UNAVAILABLE: 503,
    _C.DEADLINE_EXCEEDED: 504,
}

# For errors born as HTTP statuses (unknown route, wrong method, body too large): the
# first gRPC code of each HTTP status above, plus the few statuses only HTTP produces.
_STATUS_NAME: dict[int, str] = {
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
}
for _code, _http in HTTP_STATUS.items():
    _STATUS_NAME.setdefault(_http, _code.name)

# What a caller is told when an upstream failure carries no message meant for callers
# (e.g. "failed to connect to all addresses; ... 10.0.3.7:50051").
_GENERIC_MESSAGE: dict[grpc.StatusCode, str] = {
    _C.UNAVAILABLE: "a backend service is unavailable; retry later",
    _C.DEADLINE_EXCEEDED: "a backend service did not answer in time",
}
# ... and the reason it is given, so that every failure names one (a service that is down
# or restarting has no interceptor to attach one).
_GENERIC_REASON: dict[grpc.StatusCode, str] = {
    _C.UNAVAILABLE: "BACKEND_UNAVAILABLE",
    _C.DEADLINE_EXCEEDED: "BACKEND_TIMEOUT",
}
INTERNAL_MESSAGE = "internal error"
# A backend that is down fails every request: one warning per outage, not one each.
_upstream_failures = OutageLog("upstream call failed")
# An outage (a backend or Redis answering UNAVAILABLE) is worth retrying this much later.
RETRY_AFTER = {"Retry-After": "1"}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def status_name(http: int) -> str:
    return _STATUS_NAME.get(http, "INTERNAL" if http >= 500 else "UNKNOWN")


def detail_json(message: Message) -> dict[str, Any]:
    """A google.rpc detail message as proto JSON, with its "@type"."""
    packed = message if isinstance(message, any_pb2.Any) else _pack(message)
    try:
        return json_format.MessageToDict(packed, always_print_fields_with_no_presence=True)
    except TypeError:  # a detail type this process has no descriptor for
        return {"@type": packed.type_url}


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def error_info(reason: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    return detail_json(
        error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    )


def error_response(
    http: int,
    message: str,
    details: Iterable[dict[str, Any]] = (),
    headers: dict[str, str] | None = None,
    status: str | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "code": http,
            "status": status or status_name(http),
            "message": message,
            "details": list(details),
        }
    }
    headers = dict(headers or {})
    if http == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(body, status_code=http, headers=headers)


def rpc_error_details(err: grpc.aio.AioRpcError) -> list[dict[str, Any]]:
    for name, value in err.trailing_metadata() or ():
        if name == GRPC_DETAILS_METADATA_KEY:
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                log.warning("undecodable grpc-status-details-bin trailer")
                return []
            return [detail_json(d) for d in status.details]
    return []


def rpc_error_response(err: grpc.aio.AioRpcError, path: str = "") -> JSONResponse:
    code = err.code()
    http = http_status(code)
    details = rpc_error_details(err)
    message = err.details() or code.name.replace("_", " ").lower()
    # Domain errors (they carry ErrorInfo) are written for callers. A bare 5xx status is
    # transport or crash noise that may name internal hosts: log it, send a generic line.
    if http >= 500 and not details:
        _upstream_failures.failed(grpc_code=code.name, grpc_message=message, path=path)
        message = _GENERIC_MESSAGE.get(code, INTERNAL_MESSAGE)
        details = [error_info(_GENERIC_REASON.get(code, "INTERNAL"))]
    # The gRPC code names the status (FAILED_PRECONDITION and INVALID_ARGUMENT share 400).
    headers = RETRY_AFTER if code == _C.UNAVAILABLE else None
    return error_response(http, message, details, headers, status=code.name)


def domain_error_response(
    err: LoraplexError, headers: dict[str, str] | None = None
) -> JSONResponse:
    # Named by its gRPC code, as the same error met through a service would be.
    details = [error_info(err.reason, err.metadata)]
    if "retry_after_seconds" in err.metadata:  # a rate limit says when to come back
        headers = (headers or {}) | {"Retry-After": err.metadata["retry_after_seconds"]}
    return error_response(
        http_status(err.code), err.message, details, headers, status=err.code.name
    )


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    """(field, description) of one pydantic error, in words a caller can act on."""
    loc = [str(part) for part in error.get("loc", ())]
    field = ".".join(loc[1:] if loc[:1] == ["body"] else loc)
    if error.get("type") == "json_invalid":
        return "", "request body is not valid JSON"
    if not field and error.get("type") == "missing":
        return "", "a JSON request body is required"
    if not field and error.get("type") in {"model_attributes_type", "dict_type"}:
        return "", "the request body must be a JSON object sent as application/json"
    return field, str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def validation_error_response(err: RequestValidationError) -> JSONResponse:
    violations = [_describe(e) for e in err.errors()]
    message = "; ".join(f"{f}: {d}" if f else d for f, d in violations) or "invalid request"
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )
    return error_response(400, message, [error_info("INVALID_ARGUMENT"), detail_json(bad_request)])


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the one body. Unexpected exceptions are handled by
    gateway.middleware.UnhandledErrorMiddleware so that metrics still see the 500."""

    async def on_rpc_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, grpc.aio.AioRpcError)
        return rpc_error_response(err, request.url.path)

    async def on_domain_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, LoraplexError)
        return domain_error_response(err)

    async def on_redis_outage(_: Request, err: Exception) -> JSONResponse:
        outage = domain_error(err)  # the gateway's own Redis: API keys, tenants
        assert outage is not None
        return domain_error_response(outage, RETRY_AFTER)

    async def on_validation_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        return validation_error_response(err)

    async def on_http_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        return error_response(err.status_code, str(err.detail), headers=err.headers)

    app.add_exception_handler(grpc.aio.AioRpcError, on_rpc_error)
    app.add_exception_handler(LoraplexError, on_domain_error)
    for outage in REDIS_OUTAGE:
        app.add_exception_handler(outage, on_redis_outage)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)


# What any route may answer besides its success, in the one error body: bad input (400,
# never FastAPI's 422), authentication (401), a slow or large body (408, 413), a rate limit
# or full queue (429), a crash (500), a backend outage or deadline (503, 504); and what
# depends on the resource: someone else's or missing (403, 404), a conflict (409).
DOCUMENTED_ERRORS = (400, 401, 403, 404, 408, 409, 413, 429, 500, 503, 504)

ERROR_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message", "details"],
            "properties": {
                "code": {"type": "integer"},
                "status": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}


def document_errors(openapi: dict[str, Any]) -> dict[str, Any]:
    """Rewrite FastAPI's OpenAPI document to state the statuses the gateway really returns:
    every operation lists DOCUMENTED_ERRORS with the error body, and no 422."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ERROR_BODY_SCHEMA
    for schema in ("HTTPValidationError", "ValidationError"):
        schemas.pop(schema, None)
    reference = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path in openapi.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for http in DOCUMENTED_ERRORS:
                responses.setdefault(
                    str(http), {"description": status_name(http), "content": reference}
                )
    return openapi
