"""`from services import RealtimeCompositor, get_compositor`: the in-process library API on
the real model, real adapters and a real Redis."""

from __future__ import annotations

import pytest

from services import RealtimeCompositor, get_compositor
from services.common.errors import FailedPrecondition, NotFound
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS

pytestmark = pytest.mark.integration

PROMPT = "Customer: Where is my order 4821?\nAgent:"


@pytest.fixture(scope="module")
async def compositor(redis_url, tmp_path_factory):
    settings = InferenceSettings(adapter_store_dir=tmp_path_factory.mktemp("store"))
    async with get_compositor(redis_url, settings) as compositor:
        await compositor.register("lib", "shop", DEMO_ADAPTERS / "retailer")
        await compositor.register("lib", "money", DEMO_ADAPTERS / "bank")
        yield compositor


async def test_generate_with_an_adapter_a_composition_and_the_base(compositor):
    assert isinstance(compositor, RealtimeCompositor)
    shop = await compositor.generate("lib", PROMPT, adapter="shop", temperature=0)
    base = await compositor.generate("lib", PROMPT, temperature=0)
    halves = await compositor.generate(
        "lib", PROMPT, compose=[("shop", 0.5), ("shop@1", 0.5)], temperature=0
    )
    assert shop.adapter.name == "shop" and base.adapter is None
    assert halves.generation.text == shop.generation.text  # cat is exact: 0.5 + 0.5 = 1
    assert halves.adapter.name.startswith("composed:")
    mixed = await compositor.generate(
        "lib", PROMPT, compose=[("shop", 0.5), ("money", 0.5)], method="svd", temperature=0
    )
    assert [r.name for r in mixed.adapter.composed_of] == ["shop", "money"]


async def test_stream_yields_the_same_text(compositor):
    whole = await compositor.generate("lib", PROMPT, adapter="money", temperature=0)
    pieces = [p async for p in compositor.stream("lib", PROMPT, adapter="money", temperature=0)]
    assert "".join(pieces) == whole.generation.text and len(pieces) > 1


async def test_swap_rollback_and_stats(compositor):
    second = await compositor.register("lib", "flip", DEMO_ADAPTERS / "airline")
    first = await compositor.register("lib", "flip", DEMO_ADAPTERS / "retailer")
    assert (second.version, first.version) == (1, 2)
    swapped = await compositor.swap("lib", "flip", 1)
    assert (swapped.previous.version, swapped.current.version) == (2, 1)
    reply = await compositor.generate("lib", PROMPT, adapter="flip", max_new_tokens=2)
    assert reply.adapter.version == 1
    back = await compositor.rollback("lib", "flip")
    assert back.current.version == 2
    with pytest.raises(FailedPrecondition):
        await compositor.swap("lib", "flip", 1, expected_sha256="0" * 64)
    (host,) = compositor.cache_stats()  # CPU: one tier
    assert host.tier == "host" and host.entries >= 2 and host.misses >= 2
    with pytest.raises(NotFound):
        await compositor.generate("other-tenant", PROMPT, adapter="shop")
