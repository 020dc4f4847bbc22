"""Over real gRPC, with the real model: one tenant's poisoned numbers or huge prompt never
hurt another tenant's requests. Poison is refused at the door with a reason (400-class), the
streams of the other tenants all complete, and the server stays responsive meanwhile."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraplex.inference.v1 import inference_service_pb2 as pb
from tests.helpers import (
    DEMO_ADAPTERS,
    DEMO_TENANTS,
    adapter_files,
    error_reason,
    new_tenant,
    register,
)
from tests.integration.test_composition import composed_request, composition
from tests.integration.test_inference_service import expect_error, generate_request

pytestmark = pytest.mark.integration


def poisoned_files(config_changes=None, weight_value=None) -> dict[str, bytes]:
    files = adapter_files(DEMO_ADAPTERS / "retailer")
    config = json.loads(files["adapter_config.json"]) | (config_changes or {})
    files["adapter_config.json"] = json.dumps(config).encode()
    if weight_value is not None:
        tensors = load_safetensors(files["adapter_model.safetensors"])
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], weight_value)
        files["adapter_model.safetensors"] = save_safetensors(tensors)
    return files


def upload(tenant: str, files: dict[str, bytes]) -> pb.RegisterAdapterRequest:
    return pb.RegisterAdapterRequest(
        tenant=tenant,
        name="poison",
        files=[pb.AdapterFile(name=k, content=v) for k, v in files.items()],
    )


@pytest.fixture
async def victims(stub) -> dict[str, str]:
    """Three tenants, each with its own demo adapter named "support"."""
    tenants = {demo: new_tenant() for demo in DEMO_TENANTS}
    for demo, tenant in tenants.items():
        await register(stub, tenant, demo)
    return tenants


def greedy(tenant: str) -> pb.GenerateRequest:
    return generate_request(tenant, "support", max_new_tokens=40)


async def stream_text(stub, tenant: str) -> str:
    return "".join([m.text async for m in stub.GenerateStream(greedy(tenant))])


async def test_poisoned_adapters_and_compositions_are_refused_while_others_stream(stub, victims):
    expected = {t: (await stub.Generate(greedy(t))).text for t in victims.values()}
    streams = [asyncio.ensure_future(stream_text(stub, t)) for t in victims.values()]
    mallory = new_tenant()
    await register(stub, mallory, "bank", name="money")
    refusals = {
        "nan weights": upload(mallory, poisoned_files(weight_value=float("nan"))),
        "inf weights": upload(mallory, poisoned_files(weight_value=float("inf"))),
        "nan alpha": upload(mallory, poisoned_files({"lora_alpha": float("nan")})),
        "text alpha": upload(mallory, poisoned_files({"lora_alpha": "x"})),
        "bad regex": upload(mallory, poisoned_files({"target_modules": "q_proj(("})),
    }
    for what, request in refusals.items():
        err = await expect_error(stub.RegisterAdapter(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_reason(err) in {"NON_FINITE_WEIGHTS", "BAD_CONFIG"}, what
    huge = composed_request(mallory, composition(("money", 1e38)))
    err = await expect_error(stub.Generate(huge), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_reason(err) == "BAD_COMPOSITION_WEIGHTS"

    texts = await asyncio.gather(*streams)
    assert dict(zip(victims.values(), texts, strict=True)) == expected


async def test_a_huge_prompt_is_refused_at_once_without_stalling_anyone(stub, channel, victims):
    tenant = victims["bank"]
    stream = asyncio.ensure_future(stream_text(stub, tenant))
    started = time.perf_counter()
    huge = generate_request(new_tenant(), prompt="x" * 8_000_000)
    err = await expect_error(stub.Generate(huge), grpc.StatusCode.INVALID_ARGUMENT)
    refused_after = time.perf_counter() - started
    assert error_reason(err) == "CONTEXT_LENGTH_EXCEEDED"
    health = health_pb2_grpc.HealthStub(channel)
    reply = await asyncio.wait_for(health.Check(health_pb2.HealthCheckRequest()), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert len(await stream) > 0
    # Tokenizing 8 MB takes seconds here; the refusal needs none of it (generous bound).
    assert refused_after < 2.0


async def test_a_huge_identifier_is_refused_with_its_reason_not_a_transport_error(stub):
    # The refusal quotes the id; bounded, it still fits gRPC's trailers (else the caller
    # saw RESOURCE_EXHAUSTED with gRPC's internal text).
    for request in (
        generate_request("t" * 7000),
        generate_request(new_tenant(), "a" * 7000),
    ):
        err = await expect_error(stub.Generate(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_reason(err) in {"INVALID_TENANT", "INVALID_ADAPTER_NAME"}
        assert len(err.details()) <= 512
