"""Calls to the other services: their errors come back as domain errors with the same
status code and reason, so a caller of this service sees e.g. the registry's NOT_FOUND
(ADAPTER_NOT_FOUND) rather than an INTERNAL error."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status.rpc_status import GRPC_DETAILS_METADATA_KEY

from services.common.errors import LoraplexError

T = TypeVar("T")


def _reason(err: grpc.aio.AioRpcError) -> str:
    for name, value in err.trailing_metadata() or ():
        if name == GRPC_DETAILS_METADATA_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def remote_error(err: grpc.aio.AioRpcError, service: str) -> LoraplexError:
    code = err.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        message = f"the {service} service is unavailable; try again"
    elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        message = f"the {service} service failed"
    else:
        message = err.details() or code.name
    error = LoraplexError(message, reason=_reason(err) or f"{service.upper()}_{code.name}")
    error.code = code
    return error


async def call(reply: Awaitable[T], service: str) -> T:
    try:
        return await reply
    except grpc.aio.AioRpcError as err:
        raise remote_error(err, service) from err
