"""One hierarchy of domain errors; each knows its gRPC status and a machine-readable reason.

Domain code raises these; the server interceptor turns them into gRPC statuses with a
google.rpc.ErrorInfo detail (AIP-193), and the gateway turns those into HTTP responses.
"""

from __future__ import annotations

import logging
import time

import grpc
import redis.exceptions

log = logging.getLogger(__name__)

ERROR_DOMAIN = "loraplex.dev"


class LoraplexError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(LoraplexError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(LoraplexError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(LoraplexError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(LoraplexError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(LoraplexError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(LoraplexError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(LoraplexError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(LoraplexError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DataLoss(LoraplexError):
    """Stored data is missing or corrupt: the platform's fault, not the caller's."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


# A Redis that is down, restarting or too slow: expected in operation, not a bug.
REDIS_OUTAGE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_OUTAGE_WARNING_SECONDS = 30.0


class OutageLog:
    """One warning per outage (at most one per 30 s), not a traceback or a line per
    request; it says how many requests failed since the last one."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._last = float("-inf")
        self._since = 0

    def failed(self, **extra: object) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._last >= _OUTAGE_WARNING_SECONDS:
            log.warning(self._message, extra={**extra, "requests_failed": self._since})
            self._last, self._since = now, 0


_redis_outages = OutageLog("redis unavailable: answering UNAVAILABLE")


def domain_error(err: Exception) -> LoraplexError | None:
    """The domain error `err` stands for: itself, UNAVAILABLE (REDIS_UNAVAILABLE, which
    callers may retry) for a Redis outage, or None for anything else (a bug)."""
    if isinstance(err, LoraplexError):
        return err
    if isinstance(err, REDIS_OUTAGE):
        _redis_outages.failed(error=type(err).__name__)
        return Unavailable("the data store is unavailable; retry later", reason="REDIS_UNAVAILABLE")
    return None
