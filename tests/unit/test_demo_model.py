"""The demo base model (models/base) and tenant LoRA adapters (models/adapters) load offline
and each adapter fits its own tenant's held-out text better than the base and the other adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

MODELS = Path(__file__).resolve().parents[2] / "models"
BASE = MODELS / "loraplex-tiny"
TENANTS = ("retailer", "bank", "airline")
N_HELDOUT = 32  # dialogues per tenant: enough for stable means, ~15 s for the module on 2 cores


def heldout(tenant: str) -> list[str]:
    text = (MODELS / "data" / tenant / "heldout.txt").read_text(encoding="utf-8")
    return [d.strip("\n") + "\n" for d in text.split("\n\n") if d.strip()][:N_HELDOUT]


def load(adapter: str | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, MODELS / "adapters" / adapter)
    return model.eval()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tok, docs: list[str]) -> float:
    """Mean per-token NLL over <s> doc </s>, each document scored on its own."""
    enc = tok([d + tok.eos_token for d in docs], padding=True, return_tensors="pt")
    logits = model(**enc).logits[:, :-1]
    targets = enc.input_ids[:, 1:].masked_fill(enc.attention_mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets).item()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BASE)


@pytest.fixture(scope="module")
def losses(tok) -> dict[str, dict[str, float]]:
    """{model: {tenant: held-out loss}} for the base model and every adapter."""
    docs = {t: heldout(t) for t in TENANTS}
    table = {}
    for name in ("base", *TENANTS):
        model = load(None if name == "base" else name)
        table[name] = {t: mean_loss(model, tok, d) for t, d in docs.items()}
    return table


@pytest.mark.parametrize("tenant", TENANTS)
def test_adapter_fits_its_tenant(losses, tenant):
    own = losses[tenant][tenant]
    assert own < losses["base"][tenant], losses
    for other in TENANTS:
        if other != tenant:
            assert own < losses[other][tenant], losses


def test_adapters_are_heterogeneous_and_name_the_base():
    configs = {
        t: json.loads((MODELS / "adapters" / t / "adapter_config.json").read_text())
        for t in TENANTS
    }
    assert {c["base_model_name_or_path"] for c in configs.values()} == {"loraplex-tiny"}
    assert {c["r"] for c in configs.values()} == {8, 16}
    assert len({frozenset(c["target_modules"]) for c in configs.values()}) == 3
    for t in TENANTS:
        assert (MODELS / "adapters" / t / "adapter_model.safetensors").is_file()


def test_tokenizer_round_trip(tok):
    text = "Customer: Where is my order 4821?\nAgent: Your order 4821 shipped on Monday."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": "Where is my order?"},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "System: You are a helpful agent.\nCustomer: Where is my order?\nAgent:"
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(turn, tokenize=False) == "Customer: Hi\nAgent: Hello!\n"
