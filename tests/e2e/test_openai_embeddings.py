"""POST /v1/embeddings with the official openai client against the running stack. The
expected vectors are computed here with transformers (and PEFT for an adapter), one text
at a time: the mean over tokens of the last hidden state, unit length."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL_DIR = InferenceSettings().model_dir
BASE = MODEL_DIR.name
TEXTS = ["Customer: I lost my card yesterday.", "Customer: Where is my order 4821?\nAgent:"]


def client(stack, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys[f"{tenant.upper()}_KEY"])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@torch.inference_mode()
def reference(texts: list[str], tokenizer, adapter: str = "") -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, DEMO_ADAPTERS / adapter).get_base_model()
    decoder = model.eval().get_decoder()
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        mean = decoder(input_ids=ids).last_hidden_state[0].mean(dim=0)
        rows.append((mean / mean.norm()).numpy())
    return np.vstack(rows)


def test_base_model_embeddings_are_the_models_mean_pooled_hidden_state(stack, tokenizer):
    # The client asks for base64 by default and decodes it: this also checks the encoding.
    reply = client(stack, "bank").embeddings.create(model=BASE, input=TEXTS)
    assert reply.object == "list" and reply.model == BASE
    assert [d.index for d in reply.data] == [0, 1]
    got = np.asarray([d.embedding for d in reply.data])
    hidden_size = json.loads((MODEL_DIR / "config.json").read_text())["hidden_size"]
    assert got.shape == (2, hidden_size)
    np.testing.assert_allclose(got, reference(TEXTS, tokenizer), rtol=0, atol=1e-4)
    tokens = sum(len(tokenizer(t).input_ids) for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens


def test_an_adapter_named_by_model_embeds_with_its_weights(stack, tokenizer):
    bank = client(stack, "bank")
    reply = bank.embeddings.create(model="bank-support", input=TEXTS, encoding_format="float")
    got = np.asarray([d.embedding for d in reply.data])
    expected = reference(TEXTS, tokenizer, adapter="bank")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    base = reference(TEXTS, tokenizer)
    assert np.max(np.abs(expected - base)) > 1e-3  # the adapter is not a no-op here


def test_base64_is_the_float_values_as_little_endian_float32(stack):
    headers = {"Authorization": f"Bearer {stack.keys['BANK_KEY']}"}
    body = {"model": "bank-support", "input": TEXTS[0]}
    as_float = httpx.post(
        f"{stack.url}/v1/embeddings", json=body | {"encoding_format": "float"}, headers=headers
    )
    as_b64 = httpx.post(
        f"{stack.url}/v1/embeddings", json=body | {"encoding_format": "base64"}, headers=headers
    )
    assert as_float.status_code == as_b64.status_code == 200, as_b64.text
    floats = np.asarray(as_float.json()["data"][0]["embedding"], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(as_b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, floats)


def test_token_id_inputs_embed_like_their_text(stack, tokenizer):
    bank = client(stack, "bank")
    by_text = bank.embeddings.create(model="bank-support", input=TEXTS)
    ids = [tokenizer(t).input_ids for t in TEXTS]
    by_ids = bank.embeddings.create(model="bank-support", input=ids)
    one = bank.embeddings.create(model="bank-support", input=ids[1])
    expected = np.asarray([d.embedding for d in by_text.data])
    np.testing.assert_allclose([d.embedding for d in by_ids.data], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one.data[0].embedding, expected[1], rtol=0, atol=1e-6)
    assert one.usage.prompt_tokens == len(ids[1])


def test_refusals(stack):
    bank = client(stack, "bank")
    for model in ("no-such-adapter", "retailer-support"):  # another tenant's: the same 404
        with pytest.raises(openai.NotFoundError):
            bank.embeddings.create(model=model, input="hello")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        bank.embeddings.create(model=BASE, input="hello", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        bank.embeddings.create(model=BASE, input="hello", extra_body={"encoding_format": "hex"})
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        bank.embeddings.create(model=BASE, input=[[1, 10**9]])
