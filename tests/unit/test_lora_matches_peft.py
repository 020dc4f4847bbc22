"""Our LoRA application (forward hooks on the base model) equals PEFT's, adapter by adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from services.common.errors import InvalidArgument
from services.inference.decoding import SamplingConfig
from services.inference.engine import Engine
from services.inference.lora import parse_adapter
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS, DEMO_TENANTS, adapter_files, decode_alone

TEXT = "Customer: My flight to Zurich was cancelled, can I rebook?\nAgent:"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(InferenceSettings().model_dir, device="cpu", dtype="float32")


def load_demo(engine: Engine, tenant: str):
    files = adapter_files(DEMO_ADAPTERS / tenant)
    return parse_adapter(
        files["adapter_config.json"],
        files["adapter_model.safetensors"],
        engine.linear_shapes,
        dtype=torch.float32,
    )


@pytest.mark.parametrize("tenant", DEMO_TENANTS)
def test_logits_and_greedy_tokens_equal_peft(engine, tenant):
    base = AutoModelForCausalLM.from_pretrained(InferenceSettings().model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, DEMO_ADAPTERS / tenant).eval()
    ids = torch.tensor([engine.encode(TEXT)])
    weights = load_demo(engine, tenant)

    with torch.inference_mode():
        expected = reference(input_ids=ids).logits
        with engine.adapters([weights]):
            ours = engine.model(input_ids=ids).logits
        # A plain completion, as the engine runs it: no chat stop strings, greedy to EOS or 16.
        reference.generation_config.stop_strings = None
        expected_tokens = reference.generate(
            input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=engine.eos_token_id
        )[0, ids.shape[1] :].tolist()

    assert (ours - expected).abs().max().item() <= 1e-4
    generated = decode_alone(engine, ids[0].tolist(), weights, SamplingConfig(16, temperature=0))
    assert generated.text == engine.tokenizer.decode(expected_tokens, skip_special_tokens=True)


PROMPTS = [
    "Customer: Where is my order?\nAgent:",
    "Customer: I lost my debit card.\nAgent:",
    "Customer: Can I change my seat?\nAgent:",
    "Customer: Hello there, how are you?\nAgent:",
    "Customer: My parcel never came.\nAgent:",
]


def test_mixed_adapter_batch_equals_peft_per_row(engine):
    """One forward pass, a different adapter (or none) per row, with different ranks and
    target modules: each row equals PEFT's own mixed batch (adapter_names=...)."""
    base = AutoModelForCausalLM.from_pretrained(InferenceSettings().model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, DEMO_ADAPTERS / "retailer", adapter_name="retailer")
    for tenant in ("bank", "airline"):
        reference.load_adapter(DEMO_ADAPTERS / tenant, adapter_name=tenant)
    reference.eval()
    rows = ["retailer", "bank", "__base__", "airline", "bank"]
    encoded = [engine.encode(p) for p in PROMPTS]
    length = min(len(e) for e in encoded)
    ids = torch.tensor([e[:length] for e in encoded])
    weights = {t: load_demo(engine, t) for t in DEMO_TENANTS}

    with torch.inference_mode():
        expected = reference(input_ids=ids, adapter_names=rows).logits
        with engine.adapters([weights.get(r) for r in rows]):
            ours = engine.model(input_ids=ids).logits
        with engine.adapters([None] * len(rows)):
            plain = engine.model(input_ids=ids).logits

    assert (ours - expected).abs().max().item() <= 1e-4
    # The adapters really change each adapted row, and only those rows.
    changed = (ours - plain).abs().amax(dim=(1, 2))
    assert [bool(c > 1e-3) for c in changed] == [r != "__base__" for r in rows]


def test_adapter_for_another_architecture_is_refused(engine, foreign_adapter_files):
    with pytest.raises(InvalidArgument) as info:
        parse_adapter(
            foreign_adapter_files["adapter_config.json"],
            foreign_adapter_files["adapter_model.safetensors"],
            engine.linear_shapes,
            dtype=torch.float32,
        )
    assert info.value.reason in {"BASE_MODEL_MISMATCH", "TARGET_MODULES_NOT_FOUND"}


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (b"{not json", "BAD_CONFIG"),
        (b'{"peft_type": "IA3"}', "UNSUPPORTED_ADAPTER"),
        (
            b'{"peft_type": "LORA", "use_dora": true, "target_modules": ["q_proj"]}',
            "UNSUPPORTED_ADAPTER",
        ),
        (b'{"peft_type": "LORA", "target_modules": ["c_attn"]}', "TARGET_MODULES_NOT_FOUND"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(engine, config, reason):
    weights = adapter_files(DEMO_ADAPTERS / "retailer")["adapter_model.safetensors"]
    with pytest.raises(InvalidArgument) as info:
        parse_adapter(config, weights, engine.linear_shapes, dtype=torch.float32)
    assert info.value.reason == reason


def test_garbage_weights_are_refused(engine):
    config = adapter_files(DEMO_ADAPTERS / "retailer")["adapter_config.json"]
    with pytest.raises(InvalidArgument) as info:
        parse_adapter(config, b"\x80\x04pickle", engine.linear_shapes, dtype=torch.float32)
    assert info.value.reason == "BAD_WEIGHTS"
