"""The shared server machinery: health before/after ready, error mapping, metrics."""

from __future__ import annotations

import logging

import grpc
import prometheus_client
import pytest
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.errors import NotFound
from services.common.server import Server, ServiceSpec
from services.common.settings import ServiceSettings
from tests.helpers import error_reason

SERVICE = "loraplex.inference.v1.InferenceService"


class Failing(pb_grpc.InferenceServiceServicer):
    async def GetModelInfo(self, request, context):
        raise NotFound("no such thing", reason="THING_NOT_FOUND", thing="x")

    async def CacheStats(self, request, context):
        raise RuntimeError("secret database password is hunter2")

    async def ListAdapters(self, request, context):
        raise redis.exceptions.ConnectionError("Error 111 connecting to 10.0.0.7:6379")


@pytest.fixture
async def server():
    srv = Server(
        ServiceSettings(port=0, shutdown_grace_seconds=0.1),
        [ServiceSpec(SERVICE, Failing(), pb_grpc.add_InferenceServiceServicer_to_server)],
    )
    await srv.start()
    yield srv
    await srv.stop()


async def test_health_is_not_serving_until_ready(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.set_ready()
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING


async def test_domain_error_maps_to_its_status_with_error_info(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing"
    assert error_reason(info.value) == "THING_NOT_FOUND"


async def test_unknown_error_is_internal_without_leaking_its_message(server, caplog):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.InferenceServiceStub(channel).CacheStats(pb.CacheStatsRequest())
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in info.value.details()
    assert "hunter2" in caplog.text  # the traceback is logged for operators


async def test_a_redis_outage_is_unavailable_with_one_warning_and_no_traceback(server, caplog):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListAdapters(pb.ListAdaptersRequest())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(info.value) == "REDIS_UNAVAILABLE"
            assert "10.0.0.7" not in info.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert len([r for r in caplog.records if "redis unavailable" in r.getMessage()]) <= 1


async def test_handled_rpcs_are_counted(server):
    def handled() -> float:
        return (
            prometheus_client.REGISTRY.get_sample_value(
                "loraplex_grpc_server_handled_total",
                {"grpc_service": SERVICE, "grpc_method": "GetModelInfo", "grpc_code": "NOT_FOUND"},
            )
            or 0.0
        )

    before = handled()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert handled() == before + 1
