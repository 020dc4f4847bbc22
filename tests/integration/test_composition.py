"""Per-request composition over real gRPC: several registered adapters mixed with weights,
cached under a canonical key, served in mixed batches; and every refusal the issue names."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from tests.helpers import error_reason, new_tenant, register
from tests.integration.test_inference_service import expect_error, generate_request

pytestmark = pytest.mark.integration


def composition(*parts: tuple[str, float], method: str = "", **options) -> pb.Composition:
    return pb.Composition(
        parts=[
            pb.Composition.Part(adapter=common_pb2.AdapterRef(name=name), weight=weight)
            for name, weight in parts
        ],
        method=method,
        **options,
    )


def composed_request(tenant: str, mix: pb.Composition, **params) -> pb.GenerateRequest:
    request = generate_request(tenant, **params)
    request.composition.CopyFrom(mix)
    return request


@pytest.fixture
async def tenant(stub) -> str:
    tenant = new_tenant()
    await register(stub, tenant, "retailer", name="shop")
    await register(stub, tenant, "bank", name="money")
    return tenant


async def test_a_weight_of_zero_leaves_exactly_the_other_adapter(stub, tenant):
    alone = await stub.Generate(generate_request(tenant, "shop", max_new_tokens=24))
    mixed = await stub.Generate(
        composed_request(tenant, composition(("shop", 1.0), ("money", 0.0)), max_new_tokens=24)
    )
    assert mixed.text == alone.text
    assert mixed.adapter.name.startswith("composed:")
    assert [(a.name, a.version) for a in mixed.composed_of] == [("shop", 1), ("money", 1)]


async def test_the_same_mix_in_any_order_is_composed_once(stub, tenant):
    first = composition(("shop", 0.7), ("money", 0.3))
    reordered = composition(("money", 0.3), ("shop", 0.7))
    before = await stub.CacheStats(pb.CacheStatsRequest())
    one = await stub.Generate(composed_request(tenant, first))
    two = await stub.Generate(composed_request(tenant, reordered))
    after = await stub.CacheStats(pb.CacheStatsRequest())
    assert one.adapter.name == two.adapter.name and one.text == two.text
    assert after.misses - before.misses == 1  # composed on the first request only
    assert after.hits - before.hits >= 1
    other = await stub.Generate(
        composed_request(tenant, composition(("shop", 0.5), ("money", 0.5)))
    )
    assert other.adapter.name != one.adapter.name


@pytest.mark.parametrize("method", ["cat", "svd", "ties", "dare_linear", "dare_ties"])
async def test_each_method_serves_alongside_plain_adapters(stub, tenant, method):
    options = {"density": 0.5, "seed": 7} if method in {"ties", "dare_linear", "dare_ties"} else {}
    # linear/ties/dare need equal ranks: the same adapter twice under two names qualifies.
    second = "money" if method in {"cat", "svd"} else "shop"
    mix = composition(("shop", 0.6), (second, 0.4), method=method, **options)
    requests = [
        composed_request(tenant, mix),
        generate_request(tenant, "shop"),
        generate_request(tenant, "money"),
        generate_request(tenant),
    ]
    together = await asyncio.gather(*(stub.Generate(r) for r in requests))
    assert together[0].usage.completion_tokens > 0
    assert together[0].adapter.name.startswith("composed:")
    alone = await stub.Generate(requests[0])
    assert together[0].text == alone.text  # batching with others changes nothing


async def test_unknown_or_foreign_adapter_in_a_mix_is_not_found_by_name(stub, tenant):
    other = new_tenant()
    await register(stub, other, "airline", name="fly")
    for name in ("nope", "fly"):
        err = await expect_error(
            stub.Generate(composed_request(tenant, composition(("shop", 0.5), (name, 0.5)))),
            grpc.StatusCode.NOT_FOUND,
        )
        assert repr(name) in err.details()


@pytest.mark.parametrize(
    ("mix", "reason"),
    [
        (composition(("shop", math.nan), ("money", 0.5)), "BAD_COMPOSITION_WEIGHTS"),
        (composition(("shop", math.inf), ("money", 0.5)), "BAD_COMPOSITION_WEIGHTS"),
        (composition(("shop", 0.0), ("money", 0.0)), "BAD_COMPOSITION_WEIGHTS"),
        (composition(*[("shop", 0.1)] * 9), "TOO_MANY_ADAPTERS"),
        (composition(("shop", 0.5), ("money", 0.5), method="magic"), "UNKNOWN_COMPOSITION_METHOD"),
        # Ranks 8 and 16 cannot be merged factor-wise (PEFT refuses too).
        (composition(("shop", 0.5), ("money", 0.5), method="linear"), "RANK_MISMATCH"),
        (
            composition(("shop", 0.5), ("money", 0.5), method="ties", density=1.5),
            "BAD_COMPOSITION_PARAMS",
        ),
    ],
)
async def test_bad_compositions_are_invalid_argument(stub, tenant, mix, reason):
    err = await expect_error(
        stub.Generate(composed_request(tenant, mix)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_reason(err) == reason


async def test_an_adapter_and_a_composition_together_are_refused(stub, tenant):
    request = composed_request(tenant, composition(("shop", 0.5), ("money", 0.5)))
    request.adapter.name = "shop"
    err = await expect_error(stub.Generate(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert error_reason(err) == "BAD_INPUT"
