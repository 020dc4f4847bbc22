"""A FAKE InferenceService for the gateway's unit tests (only these use a fake), served by
a real grpc.aio server built by services.common.server, so errors travel exactly as in
production: status code + ErrorInfo trailer. Plus the check every error response gets."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from grpc_health.v1.health_pb2 import HealthCheckResponse

from gateway.replicas import INFERENCE_SERVICE
from gateway.settings import GatewaySettings
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgument, LoraplexError, NotFound
from services.common.server import Server, ServiceSpec
from services.common.settings import ServiceSettings

ADMIN_KEY = "test-admin-key"
BASE_MODEL = "tiny-base"
MAX_NEW_TOKENS_LIMIT = 64
# new_tenant fixture: makes a tenant with a key, returns headers that authenticate as it.
NewTenant = Callable[[str], Awaitable[dict[str, str]]]
LIST_PAGE = 2  # the fake serves tiny pages so the gateway must follow next_page_token


def adapter_info(tenant: str, name: str, version: int = 1, shared: bool = False) -> Any:
    info = common_pb2.AdapterInfo(tenant=tenant, name=name, version=version, shared=shared)
    info.created_at.FromSeconds(1_700_000_000 + version)
    return info


class FakeInference(pb_grpc.InferenceServiceServicer):
    """Records every request; answers like the real service would, including its errors."""

    def __init__(self) -> None:
        self.requests: dict[str, list[Any]] = defaultdict(list)
        # Set fail[method] to make that RPC raise the given domain error.
        self.fail: dict[str, LoraplexError] = {}
        self.adapters: list[common_pb2.AdapterInfo] = []

    def _receive(self, method: str, request: Any) -> None:
        self.requests[method].append(request)
        if method in self.fail:
            raise self.fail[method]

    def _visible(self, tenant: str) -> list[common_pb2.AdapterInfo]:
        own = [a for a in self.adapters if a.tenant == tenant and not a.shared]
        return own + [a for a in self.adapters if a.shared]

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        self._receive("Generate", request)
        ref = request.adapter
        if ref.name and ref.name not in {a.name for a in self._visible(request.tenant)}:
            raise NotFound(
                f"adapter {ref.name!r} not found", reason="ADAPTER_NOT_FOUND", adapter=ref.name
            )
        limit = request.params.max_new_tokens
        if limit > MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument(
                f"max_new_tokens must be at most {MAX_NEW_TOKENS_LIMIT}",
                reason="MAX_NEW_TOKENS_TOO_LARGE",
                limit=MAX_NEW_TOKENS_LIMIT,
            )
        source = request.prompt or request.messages[-1].content
        generated = min(limit, 5)
        return pb.GenerateResponse(
            text=f"echo:{source}",
            finish_reason=pb.FINISH_REASON_LENGTH if limit <= 5 else pb.FINISH_REASON_STOP,
            usage=common_pb2.TokenUsage(
                prompt_tokens=7, completion_tokens=generated, total_tokens=7 + generated
            ),
            timing=pb.Timing(queue_seconds=0.25, total_seconds=1.5),
            uncertainty=pb.UncertaintyStats(mean_token_entropy=0.5, min_token_prob=0.125),
            adapter=common_pb2.AdapterRef(
                name=ref.name, version=ref.version or (3 if ref.name else 0)
            ),
        )

    async def GenerateStream(self, request: pb.GenerateRequest, context: Any):
        """Generate's reply in three pieces, then the whole; fail["GenerateStream.mid"]
        makes it fail after the first piece, as a model error mid-generation would."""
        reply = await self.Generate(request, context)
        self.requests["GenerateStream"].append(request)
        third = len(reply.text) // 3
        yield pb.GenerateStreamResponse(text=reply.text[:third])
        if "GenerateStream.mid" in self.fail:
            raise self.fail["GenerateStream.mid"]
        yield pb.GenerateStreamResponse(text=reply.text[third : 2 * third])
        yield pb.GenerateStreamResponse(text=reply.text[2 * third :], final=reply)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Any
    ) -> pb.ListAdaptersResponse:
        self._receive("ListAdapters", request)
        start = int(request.page_token or 0)
        visible = self._visible(request.tenant)
        end = start + LIST_PAGE
        return pb.ListAdaptersResponse(
            adapters=visible[start:end], next_page_token=str(end) if end < len(visible) else ""
        )

    async def RegisterAdapter(
        self, request: pb.RegisterAdapterRequest, context: Any
    ) -> pb.RegisterAdapterResponse:
        self._receive("RegisterAdapter", request)
        info = adapter_info(request.tenant, request.name, request.version or 1, request.shared)
        info.size_bytes = sum(len(f.content) for f in request.files)
        info.sha256 = request.expected_sha256
        self.adapters.append(info)
        return pb.RegisterAdapterResponse(adapter=info)

    async def CacheStats(
        self, request: pb.CacheStatsRequest, context: Any
    ) -> pb.CacheStatsResponse:
        self._receive("CacheStats", request)
        return pb.CacheStatsResponse(
            capacity_bytes=2**33,
            used_bytes=1234,
            entries=1,
            hits=10,
            misses=2,
            adapters=[pb.CachedAdapter(tenant="bank", name="fraud", version=2, size_bytes=1234)],
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Any
    ) -> pb.GetModelInfoResponse:
        self._receive("GetModelInfo", request)
        return pb.GetModelInfoResponse(
            model_id=BASE_MODEL, max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT
        )


class FakeInferenceServer:
    def __init__(self, fake: FakeInference, server: Server) -> None:
        self.fake = fake
        self.server = server
        self.addr = f"127.0.0.1:{server.port}"

    async def set_serving(self, serving: bool) -> None:
        status = HealthCheckResponse.SERVING if serving else HealthCheckResponse.NOT_SERVING
        await self.server.health.set(INFERENCE_SERVICE, status)


@asynccontextmanager
async def serve_fake_inference() -> AsyncIterator[FakeInferenceServer]:
    fake = FakeInference()
    spec = ServiceSpec(INFERENCE_SERVICE, fake, pb_grpc.add_InferenceServiceServicer_to_server)
    server = Server(ServiceSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=0.1), [spec])
    await server.start()
    await server.set_ready()
    try:
        yield FakeInferenceServer(fake, server)
    finally:
        await server.stop()


def gateway_settings(inference_addr: str) -> GatewaySettings:
    return GatewaySettings(
        **{"loraplex_admin_key": ADMIN_KEY},  # the field reads only its env alias
        inference_addr=inference_addr,
        request_timeout_seconds=5,
        health_timeout_seconds=1,
        # Each gateway its own analytics outbox: the tests share one Redis.
        gateway_instance=f"test-{uuid.uuid4().hex[:12]}",
    )


def assert_error(response: httpx.Response, http: int, status: str) -> dict[str, Any]:
    """The AIP-193 body every failure has; returns its "error" object."""
    assert response.status_code == http, response.text
    error = response.json()["error"]
    assert error["code"] == http
    assert error["status"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    return error
