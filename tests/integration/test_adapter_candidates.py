"""Candidate versions in the inference registry: registered without serving, reachable by
version, promoted by a swap, dropped by a discard; GetAdapter with files."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from tests.helpers import error_reason, new_tenant, register

pytestmark = pytest.mark.integration


def _ref(name: str, version: int = 0) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(name=name, version=version)


async def _generate_version(stub, tenant: str, name: str, version: int = 0) -> int:
    reply = await stub.Generate(
        pb.GenerateRequest(
            tenant=tenant,
            adapter=_ref(name, version),
            prompt="Customer: hi\nAgent:",
            params=pb.SamplingParams(max_new_tokens=2, temperature=0),
        )
    )
    return reply.adapter.version


async def test_candidate_waits_until_promoted_and_a_second_discard_is_refused(stub):
    tenant = new_tenant()
    await register(stub, tenant, "retailer")
    candidate = await register(stub, tenant, "bank", candidate=True)
    assert candidate.version == 2
    assert await _generate_version(stub, tenant, "support") == 1  # current still serves
    assert await _generate_version(stub, tenant, "support", 2) == 2  # reachable by version
    got = await stub.GetAdapter(pb.GetAdapterRequest(tenant=tenant, adapter=_ref("support", 2)))
    assert (got.candidate, got.serving) == (True, False)

    await stub.SwapAdapter(pb.SwapAdapterRequest(tenant=tenant, name="support", version=2))
    got = await stub.GetAdapter(pb.GetAdapterRequest(tenant=tenant, adapter=_ref("support")))
    assert (got.adapter.version, got.candidate, got.serving) == (2, False, True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DiscardCandidate(
            pb.DiscardCandidateRequest(tenant=tenant, name="support", version=2)
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "NOT_A_CANDIDATE"


async def test_a_first_version_candidate_does_not_serve_and_discard_drops_it(stub):
    tenant = new_tenant()
    await register(stub, tenant, "retailer", name="fresh", candidate=True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate_version(stub, tenant, "fresh")  # nothing serves under the name yet
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.DiscardCandidate(pb.DiscardCandidateRequest(tenant=tenant, name="fresh", version=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate_version(stub, tenant, "fresh", 1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_first_version_candidate_can_be_promoted(stub):
    tenant = new_tenant()
    await register(stub, tenant, "retailer", name="fresh", candidate=True)
    await stub.SwapAdapter(pb.SwapAdapterRequest(tenant=tenant, name="fresh", version=1))
    assert await _generate_version(stub, tenant, "fresh") == 1


async def test_get_adapter_returns_verified_files_and_hides_other_tenants(stub):
    owner, other = new_tenant(), new_tenant()
    info = await register(stub, owner, "retailer")
    got = await stub.GetAdapter(
        pb.GetAdapterRequest(tenant=owner, adapter=_ref("support"), include_files=True)
    )
    files = {f.name: f.content for f in got.files}
    assert hashlib.sha256(files["adapter_model.safetensors"]).hexdigest() == info.sha256
    assert b'"peft_type"' in files["adapter_config.json"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAdapter(pb.GetAdapterRequest(tenant=other, adapter=_ref("support")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
