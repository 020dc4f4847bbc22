"""Structured outputs in the decoder: per-row grammars in one mixed batch (rows with and
without grammars, different schemas, different adapters), closing at the budget's end, and
schemas the library cannot compile. The real model and the demo PEFT adapters; outputs are
checked with jsonschema, an independent validator."""

from __future__ import annotations

import json

import jsonschema
import pytest

from services.common.errors import InvalidArgument
from services.inference.decoding import DecodeBatch, DecodeSequence, SamplingConfig
from services.inference.engine import Engine
from services.inference.grammar import CLOSE_WINDOW, GrammarCompiler, GrammarRequest
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS, DEMO_TENANTS, load_lora_weights

pytestmark = pytest.mark.timeout(300)

PROFILE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "vip": {"type": "boolean"},
    },
    "required": ["name", "age", "vip"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "status": {"enum": ["shipped", "delayed", "lost"]},
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 8},
            "maxItems": 3,
        },
        "refund": {"type": ["integer", "null"], "minimum": 0, "maximum": 5000},
    },
    "required": ["status", "items", "refund"],
    "additionalProperties": False,
}
# Every value bounded (a small model writes digits and words on and on): these end by
# themselves. Strings the small model never ends: only the budget can close this one.
NOTE = {
    "type": "object",
    "properties": {"note": {"type": "string"}, "tags": {"type": "array", "items": {}}},
    "required": ["note", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(InferenceSettings().model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def grammars(engine) -> GrammarCompiler:
    return GrammarCompiler(engine.tokenizer, engine.logits_size, engine.eos_token_id)


@pytest.fixture(scope="module")
def demo(engine):
    return {t: load_lora_weights(DEMO_ADAPTERS / t, engine.linear_shapes) for t in DEMO_TENANTS}


def row(engine, grammars, schema, adapter=None, *, max_new_tokens=48, seed=0, temperature=0.0):
    prompt = engine.encode(engine.render_chat([{"role": "user", "content": "Details, please."}]))
    grammar = None
    if schema is not None:
        request = GrammarRequest("" if schema == "object" else json.dumps(schema))
        grammar = grammars.row(grammars.compile(request))
    config = SamplingConfig(max_new_tokens, temperature=temperature, top_p=1.0, seed=seed)
    return DecodeSequence(prompt, adapter, config, grammar)


def decode(engine, sequences):
    batch = DecodeBatch(engine)
    batch.add(sequences)
    while len(batch):
        batch.step()
        batch.remove_finished()
    return sequences


def valid(text: str, schema) -> bool:
    try:
        value = json.loads(text)
        jsonschema.validate(value, {"type": "object"} if schema == "object" else schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_a_mixed_batch_gives_each_row_what_it_would_get_alone(engine, grammars, demo):
    # (schema, adapter, sampling) per row: free text, two schemas, any object; 3 adapters.
    plan = [
        (None, "retailer", 0.0),
        (PROFILE, None, 0.0),
        (ORDER, "bank", 0.0),
        ("object", "airline", 0.0),
        (PROFILE, "bank", 0.9),
        (None, None, 0.9),
    ]

    def rows():
        return [
            row(engine, grammars, s, demo.get(a), temperature=t, seed=i)
            for i, (s, a, t) in enumerate(plan)
        ]

    together = decode(engine, rows())
    alone = [decode(engine, [seq])[0] for seq in rows()]
    for (schema, _, _), mixed, single in zip(plan, together, alone, strict=True):
        assert mixed.text == single.text  # no row's grammar leaks into another row
        assert mixed.finish_reason == single.finish_reason
        if schema is not None:
            assert valid(mixed.text, schema), mixed.text
    # The free-text rows really are free: the model's own text is not JSON at all.
    assert not valid(together[0].text, "object")
    assert not valid(together[5].text, "object")


def test_sampled_outputs_always_validate(engine, grammars, demo):
    plan = [
        (schema, tenant, seed)
        for seed in range(4)
        for schema, tenant in ((PROFILE, "bank"), (ORDER, None), ("object", "retailer"))
    ]
    sequences = [
        row(
            engine,
            grammars,
            schema,
            demo.get(tenant),
            max_new_tokens=96,
            temperature=1.0,
            seed=seed,
        )
        for schema, tenant, seed in plan
    ]
    for seq, (schema, _, _) in zip(decode(engine, sequences), plan, strict=True):
        assert valid(seq.text, schema), seq.text
        # Bounded schemas end by themselves; any object's free keys may run to the budget.
        assert seq.finish_reason == ("stop" if schema != "object" else seq.finish_reason)


@pytest.mark.parametrize("budget", [24, 33, CLOSE_WINDOW + 10])
def test_a_row_out_of_budget_is_closed_and_says_length(engine, grammars, budget):
    seq = decode(engine, [row(engine, grammars, NOTE, max_new_tokens=budget, temperature=1.0)])[0]
    assert seq.finish_reason == "length"
    assert len(seq.logprobs) <= budget
    assert valid(seq.text, NOTE), seq.text


def test_a_budget_too_small_for_any_document_is_cut_like_openai(engine, grammars):
    seq = decode(engine, [row(engine, grammars, PROFILE, max_new_tokens=3)])[0]
    assert seq.finish_reason == "length"
    assert len(seq.logprobs) == 3
    assert not valid(seq.text, PROFILE)
    assert seq.text.startswith('{"')


def test_end_of_sequence_only_where_the_document_is_complete(engine, grammars):
    seq = decode(engine, [row(engine, grammars, PROFILE)])[0]
    # Ended by end-of-sequence (not the budget), the token right after the closing brace.
    assert seq.finish_reason == "stop"
    assert seq.text.endswith("}")
    assert len(seq.logprobs) == len(seq.tokens) + 1
    assert valid(seq.text, PROFILE)


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "string", "pattern": "(?<=a)b"}, "lookbehind"),
        ({"type": "strin"}, "strin"),
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_a_schema_that_cannot_compile_is_invalid_argument(grammars, schema, words):
    text = schema if isinstance(schema, str) else json.dumps(schema)
    with pytest.raises(InvalidArgument) as caught:
        grammars.compile(GrammarRequest(text))
    assert caught.value.reason == "INVALID_SCHEMA"
    assert words.lower() in caught.value.message.lower()


def test_a_token_the_grammar_refuses_fails_that_row_only(engine, grammars):
    class Refusing:  # a matcher disagreeing with its own mask (a library bug)
        forced_close = False

        def accept(self, token: int) -> bool:
            return False

    broken = row(engine, grammars, None)
    broken.grammar = Refusing()
    broken.accept(5, -0.1, 0.5, engine.eos_token_id, engine.detokenize)
    assert broken.finish_reason == "error"
    assert broken.error.reason == "GRAMMAR_ERROR"
    assert broken.tokens == []
