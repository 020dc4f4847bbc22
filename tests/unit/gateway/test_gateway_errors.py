"""gRPC status -> HTTP mapping and the error body built from a gRPC error."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status.rpc_status import GRPC_DETAILS_METADATA_KEY

from gateway.errors import http_status, rpc_error_response, status_name

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "http"),
    [
        (C.INVALID_ARGUMENT, 400),
        (C.OUT_OF_RANGE, 400),
        (C.FAILED_PRECONDITION, 400),
        (C.UNAUTHENTICATED, 401),
        (C.PERMISSION_DENIED, 403),
        (C.NOT_FOUND, 404),
        (C.ALREADY_EXISTS, 409),
        (C.ABORTED, 409),
        (C.RESOURCE_EXHAUSTED, 429),
        (C.CANCELLED, 499),
        (C.UNIMPLEMENTED, 501),
        (C.UNAVAILABLE, 503),
        (C.DEADLINE_EXCEEDED, 504),
        (C.INTERNAL, 500),
        (C.UNKNOWN, 500),
        (C.DATA_LOSS, 500),
    ],
)
def test_http_status_of_grpc_code(code: grpc.StatusCode, http: int) -> None:
    assert http_status(code) == http


@pytest.mark.parametrize(
    ("http", "name"),
    [(400, "INVALID_ARGUMENT"), (404, "NOT_FOUND"), (405, "UNIMPLEMENTED"), (500, "INTERNAL")],
)
def test_status_name_of_http_errors(http: int, name: str) -> None:
    assert status_name(http) == name


def rpc_error(code: grpc.StatusCode, message: str, info: error_details_pb2.ErrorInfo | None):
    trailing: tuple[tuple[str, bytes], ...] = ()
    if info is not None:
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
        trailing = ((GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),)
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=message
    )


def test_error_info_from_trailer_becomes_details() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="ADAPTER_NOT_FOUND", domain="loraplex.dev", metadata={"adapter": "fraud"}
    )
    response = rpc_error_response(rpc_error(C.NOT_FOUND, "adapter 'fraud' not found", info))
    assert response.status_code == 404
    assert json.loads(response.body) == {
        "error": {
            "code": 404,
            "status": "NOT_FOUND",
            "message": "adapter 'fraud' not found",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "ADAPTER_NOT_FOUND",
                    "domain": "loraplex.dev",
                    "metadata": {"adapter": "fraud"},
                }
            ],
        }
    }


def test_bare_transport_failure_does_not_leak_its_message() -> None:
    leaky = "failed to connect to all addresses; last error: 10.0.3.7:50051: Connection refused"
    response = rpc_error_response(rpc_error(C.UNAVAILABLE, leaky, None))
    error = json.loads(response.body)["error"]
    assert response.status_code == 503
    assert error["status"] == "UNAVAILABLE"
    assert "10.0.3.7" not in error["message"]
    assert [d["reason"] for d in error["details"]] == ["BACKEND_UNAVAILABLE"]


def test_a_backend_outage_is_one_warning_not_one_per_request(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            rpc_error_response(rpc_error(C.UNAVAILABLE, "Connection refused", None))
    # One per 30 s for the whole process (an earlier test may have had it already).
    assert len([r for r in caplog.records if r.msg == "upstream call failed"]) <= 1


def test_bare_client_error_keeps_its_message() -> None:
    response = rpc_error_response(rpc_error(C.INVALID_ARGUMENT, "prompt is empty", None))
    assert response.status_code == 400
    assert json.loads(response.body)["error"]["message"] == "prompt is empty"
