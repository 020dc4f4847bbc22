"""Log-probabilities the engine reports (generated tokens with their alternatives, and
prompt tokens from the prefill) equal PEFT's forward log-softmax with a real demo adapter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from services.inference.decoding import DecodeSequence, SamplingConfig
from services.inference.engine import Engine
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS, decode_together, load_lora_weights

TOLERANCE = 1e-4
DEMO = ("bank", "airline")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(InferenceSettings().model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference() -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(InferenceSettings().model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, DEMO_ADAPTERS / "bank", adapter_name="bank")
    model.load_adapter(DEMO_ADAPTERS / "airline", adapter_name="airline")
    return model.eval()


def peft_logprobs(reference: PeftModel, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """PEFT's log-softmax at every position of `ids` under `adapter` (None: the base)."""
    with torch.inference_mode():
        if adapter is None:
            with reference.disable_adapter():
                logits = reference(input_ids=torch.tensor([ids])).logits[0]
        else:
            reference.set_adapter(adapter)
            logits = reference(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_matches(details, expected: torch.Tensor, first_position: int) -> None:
    """Detail i is the token predicted at position first_position + i."""
    for i, detail in enumerate(details):
        row = expected[first_position + i]
        assert detail.logprob == pytest.approx(row[detail.token_id].item(), abs=TOLERANCE)
        if detail.top:
            values, ids = row.topk(len(detail.top))
            assert [t for t, _ in detail.top] == ids.tolist()
            assert [v for _, v in detail.top] == pytest.approx(values.tolist(), abs=TOLERANCE)


def test_generated_and_prompt_logprobs_equal_peft_per_row(engine, reference):
    """One batch, rows of different lengths (left padding) and adapters: a greedy row, a
    sampled one at temperature 1.3 (its numbers are still the model's own distribution),
    and a prompt-only one (echo with max_tokens 0)."""
    adapters = {a: load_lora_weights(DEMO_ADAPTERS / a, engine.linear_shapes) for a in DEMO}
    rows = [
        ("bank", "Customer: I lost my card yesterday.\nAgent:", SamplingConfig(8, 0.0)),
        (None, "Customer: Hi\nAgent:", SamplingConfig(8, 1.3, seed=5)),
        ("airline", "Customer: My bag is missing, what now?\nAgent:", SamplingConfig(0, 0.0)),
    ]
    sequences = [
        DecodeSequence(
            engine.encode(prompt),
            adapters.get(adapter),
            SamplingConfig(
                config.max_new_tokens,
                config.temperature,
                seed=config.seed,
                top_logprobs=5,
                prompt_logprobs=True,
            ),
        )
        for adapter, prompt, config in rows
    ]
    results = decode_together(engine, sequences)

    for (adapter, _, config), seq, result in zip(rows, sequences, results, strict=True):
        prompt = seq.prompt_ids
        generated = [d.token_id for d in result.logprobs]
        assert len(generated) == result.completion_tokens
        assert result.completion_tokens == config.max_new_tokens or result.finish_reason == "stop"
        expected = peft_logprobs(reference, adapter, prompt + generated)
        assert result.prompt_logprobs[0].logprob is None
        assert [d.token_id for d in result.prompt_logprobs] == prompt
        assert_matches(result.prompt_logprobs[1:], expected, 0)
        assert_matches(result.logprobs, expected, len(prompt) - 1)
        assert all(len(d.top) == 5 for d in result.logprobs + result.prompt_logprobs[1:])
    assert results[2].completion_tokens == 0 and results[2].logprobs == []


def test_a_one_token_prompt_has_only_its_unscored_first_token(engine):
    """Echo of a prompt that is just the start token: nothing to score, nothing to fail."""
    config = SamplingConfig(0, 0.0, top_logprobs=2, prompt_logprobs=True)
    scored, generating = decode_together(
        engine,
        [
            DecodeSequence([engine.tokenizer.bos_token_id], None, config),
            DecodeSequence(
                [engine.tokenizer.bos_token_id], None, replace(config, max_new_tokens=2)
            ),
        ],
    )
    assert scored.finish_reason == "length" and scored.completion_tokens == 0
    assert [(d.token_id, d.logprob) for d in scored.prompt_logprobs] == [
        (engine.tokenizer.bos_token_id, None)
    ]
    assert generating.completion_tokens == 2 and len(generating.logprobs) == 2
