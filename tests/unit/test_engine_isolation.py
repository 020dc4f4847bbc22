"""One tenant's bad numbers never fail another tenant's request.

Rows share forward passes, not failures: a row whose adapter makes its logits NaN or
infinite fails alone (NON_FINITE_OUTPUT), a forward pass that raises is narrowed down to the
rows that cause it (MODEL_ERROR for those only), and every admitted request is answered.
The other rows' outputs equal decoding them alone, token for token.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.errors import LoraplexError
from services.inference.decoding import DecodeSequence, SamplingConfig
from services.inference.engine import Engine
from services.inference.lora import LinearShape, LoraModule, LoraWeights
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS, DEMO_TENANTS, decode_alone, load_lora_weights

PROMPTS = [
    "Customer: Where is my order?\nAgent:",
    "Customer: I want to open a savings account.\nAgent:",
    "Customer: My flight was cancelled, can I get a refund?\nAgent:",
]
GREEDY = SamplingConfig(12, temperature=0)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(InferenceSettings().model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def adapters(engine):
    return {t: load_lora_weights(DEMO_ADAPTERS / t, engine.linear_shapes) for t in DEMO_TENANTS}


def poisoned(weights: LoraWeights, value: float) -> LoraWeights:
    """A copy whose first module's B factor is all `value` (it never passed validation)."""
    modules = {
        n: LoraModule(m.a.clone(), m.b.clone(), m.scaling) for n, m in weights.modules.items()
    }
    next(iter(modules.values())).b.fill_(value)
    return LoraWeights(modules, weights.rank, weights.lora_alpha, list(weights.target_modules))


class FailingRunner:
    """The real engine, except that a decode step raises while any row is past position
    `past`: only a long prompt gets there, so only its row is at fault."""

    def __init__(self, engine: Engine, past: int) -> None:
        self._engine, self._past = engine, past
        self.failures = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward(self, input_ids, attention_mask, position_ids, cache, lora):
        if input_ids.shape[1] == 1 and bool((position_ids > self._past).any()):
            self.failures += 1
            raise RuntimeError("injected fault")
        return self._engine.forward(input_ids, attention_mask, position_ids, cache, lora)


async def outcome(request) -> str | LoraplexError:
    """The request's whole text, or the error it was answered with."""
    try:
        chunks = [chunk async for chunk in request]
    except LoraplexError as err:
        return err
    return chunks[-1].generation.text


def submit_healthy(scheduler, engine, adapters) -> dict:
    """One streaming request per demo tenant, each with its own adapter."""
    return {
        tenant: scheduler.submit(
            tenant, DecodeSequence(engine.encode(prompt), adapters[tenant], GREEDY)
        )
        for tenant, prompt in zip(DEMO_TENANTS, PROMPTS, strict=True)
    }


def expected_alone(engine, adapters) -> dict[str, str]:
    return {
        tenant: decode_alone(engine, engine.encode(prompt), adapters[tenant], GREEDY).text
        for tenant, prompt in zip(DEMO_TENANTS, PROMPTS, strict=True)
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
async def test_a_poisoned_adapter_fails_alone_while_other_tenants_stream(
    engine, adapters, make_scheduler, value
):
    scheduler = make_scheduler(engine, max_batch_size=8)
    healthy = submit_healthy(scheduler, engine, adapters)
    bad = poisoned(adapters["retailer"], value)
    attacker = scheduler.submit("mallory", DecodeSequence(engine.encode(PROMPTS[0]), bad, GREEDY))
    results = await asyncio.gather(*(outcome(r) for r in healthy.values()))
    failure = await outcome(attacker)

    assert dict(zip(healthy, results, strict=True)) == expected_alone(engine, adapters)
    assert isinstance(failure, LoraplexError)
    assert failure.reason == "NON_FINITE_OUTPUT"
    # The model thread goes on serving.
    again = scheduler.submit("bank", DecodeSequence(engine.encode(PROMPTS[1]), None, GREEDY))
    assert isinstance(await outcome(again), str)


async def test_a_poisoned_row_joining_a_running_batch_fails_alone(engine, adapters, make_scheduler):
    scheduler = make_scheduler(engine, max_batch_size=8)
    long = SamplingConfig(60, temperature=0, ignore_eos=True)
    running = scheduler.submit(
        "bank", DecodeSequence(engine.encode(PROMPTS[1]), adapters["bank"], long)
    )
    await asyncio.sleep(0.05)  # decoding when the poisoned row arrives
    bad = poisoned(adapters["airline"], float("nan"))
    attacker = scheduler.submit("mallory", DecodeSequence(engine.encode(PROMPTS[2]), bad, GREEDY))
    failure, text = await asyncio.gather(outcome(attacker), outcome(running))
    assert failure.reason == "NON_FINITE_OUTPUT"
    assert text == decode_alone(engine, engine.encode(PROMPTS[1]), adapters["bank"], long).text


async def test_a_failing_decode_step_fails_only_the_row_that_causes_it(
    engine, adapters, make_scheduler
):
    long_prompt = " ".join(["Customer: my order is late and nobody answers."] * 20) + "\nAgent:"
    long_ids = engine.encode(long_prompt)
    assert len(long_ids) > 150 > max(len(engine.encode(p)) for p in PROMPTS) + GREEDY.max_new_tokens
    runner = FailingRunner(engine, past=len(long_ids) + 2)  # its third decode step fails
    scheduler = make_scheduler(runner, max_batch_size=8)
    healthy = submit_healthy(scheduler, engine, adapters)
    doomed = scheduler.submit(
        "mallory", DecodeSequence(long_ids, adapters["retailer"], SamplingConfig(20, 0))
    )
    results = await asyncio.gather(*(outcome(r) for r in healthy.values()))
    failure = await outcome(doomed)

    assert dict(zip(healthy, results, strict=True)) == expected_alone(engine, adapters)
    assert failure.reason == "MODEL_ERROR"
    assert runner.failures >= 1


async def test_a_failing_prefill_fails_only_its_request_and_every_admitted_one_is_answered(
    engine, adapters, make_scheduler
):
    # A module whose factors fit no layer: gathering the batch's LoRA stacks raises.
    name = next(iter(adapters["retailer"].modules))
    wrong = LinearShape(7, 5)
    broken = LoraWeights(
        {name: LoraModule(torch.ones(4, wrong.in_features), torch.ones(wrong.out_features, 4), 1)},
        rank=4,
        lora_alpha=4,
    )
    scheduler = make_scheduler(engine, max_batch_size=8, batch_wait_ms=200)
    healthy = submit_healthy(scheduler, engine, adapters)  # admitted in the same step
    doomed = scheduler.submit("mallory", DecodeSequence(engine.encode(PROMPTS[0]), broken, GREEDY))
    results = await asyncio.wait_for(
        asyncio.gather(*(outcome(r) for r in [*healthy.values(), doomed])), timeout=60
    )
    assert dict(zip(healthy, results[:-1], strict=True)) == expected_alone(engine, adapters)
    assert results[-1].reason == "MODEL_ERROR"
    assert scheduler.stats()["running"] == 0
