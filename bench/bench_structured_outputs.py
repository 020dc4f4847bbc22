"""Structured outputs: the per-token cost of grammar-constrained decoding, xgrammar vs
llguidance, on the default model's vocabulary, side by side in one run.

Per generated token a constrained row pays: computing the allowed-token mask from the
matcher's state, applying it to the logits (disallowed -> -inf), and advancing the matcher
by the sampled token. This walks the tokens of a valid document for a JSON schema (the
tokenizer's own encoding of it) through each library, for a batch of rows, and times those
three steps per token, interleaved, several rounds; schema compile time too. A decode step
of the model itself (same batch) gives the ratio that matters: how much slower a token is.
Prints a table and writes bench/results/structured_outputs.json.
"""

from __future__ import annotations

import json
import statistics
import time
from importlib.metadata import version

import llguidance
import llguidance.hf
import llguidance.torch as llg_torch
import torch
import xgrammar as xgr

from bench.common import interleaved, summarize, write_json
from services.inference.engine import Engine
from services.inference.lora_batch import LoraBatch
from services.inference.settings import InferenceSettings

ROUNDS, BATCHES = 7, (1, 8)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tier": {"enum": ["free", "pro", "enterprise"]},
    },
    "required": ["name", "age", "email", "tags", "address", "tier"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "tags": ["customer", "priority", "returns"],
    "address": {"city": "London", "zip": "W1 4AB"},
    "tier": "pro",
}


# The same output from both: compact JSON, no free whitespace.
LLGUIDANCE_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class XGrammarRows:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, rows: int) -> None:
        self.compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab), cache_enabled=False
        )
        self.rows, self.bitmask = rows, xgr.allocate_token_bitmask(rows, vocab)

    def compile(self):
        return self.compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
        )

    def start(self, grammar) -> None:
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(self.rows)]

    def step(self, logits: torch.Tensor, token: int) -> None:
        for i, matcher in enumerate(self.matchers):
            matcher.fill_next_token_bitmask(self.bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        for matcher in self.matchers:
            assert matcher.accept_token(token)


class LLGuidanceRows:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, rows: int) -> None:
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.rows, self.bitmask = rows, llg_torch.allocate_token_bitmask(rows, vocab)

    def compile(self):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=LLGUIDANCE_COMPACT)
        llguidance.LLMatcher(self.tokenizer, grammar)  # parses and checks it
        return grammar

    def start(self, grammar) -> None:
        self.matchers = [llguidance.LLMatcher(self.tokenizer, grammar) for _ in range(self.rows)]

    def step(self, logits: torch.Tensor, token: int) -> None:
        for i, matcher in enumerate(self.matchers):
            llg_torch.fill_next_token_bitmask(matcher, self.bitmask, i)
        llg_torch.apply_token_bitmask_inplace(logits, self.bitmask)
        for matcher in self.matchers:
            assert matcher.consume_token(token)


def main() -> None:
    engine = Engine(InferenceSettings().model_dir, device="cpu", dtype="float32")
    tokenizer, vocab = engine.tokenizer, engine.logits_size
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    tokens = [*engine.encode(text, special_tokens=False), engine.eos_token_id]
    print(
        f"per-token cost of constrained decoding: a {len(tokens)}-token document, vocabulary "
        f"{vocab}, {ROUNDS} interleaved rounds, {torch.get_num_threads()} threads"
    )
    print(
        f"{'rows':>4} {'library':<11} {'us/token/row':>13} {'min-max us/row':>16} "
        f"{'compile ms':>11} {'vs decode step':>15}"
    )
    report: dict[str, dict] = {}
    for rows in BATCHES:
        libraries = [XGrammarRows(tokenizer, vocab, rows), LLGuidanceRows(tokenizer, vocab, rows)]
        compiled = {lib.name: lib.compile() for lib in libraries}
        logits = torch.randn(rows, vocab)

        def walk(lib, compiled=compiled, logits=logits):
            def run() -> None:
                lib.start(compiled[lib.name])
                for token in tokens:
                    lib.step(logits.clone(), token)

            return run

        def compile_ms(lib) -> float:
            started = time.perf_counter()
            lib.compile()
            return (time.perf_counter() - started) * 1000

        samples = interleaved({lib.name: walk(lib) for lib in libraries}, ROUNDS)
        decode_ms = _decode_step_ms(engine, rows)
        for lib in libraries:
            per_token = [ms * 1000 / len(tokens) / rows for ms in samples[lib.name]]
            cost = statistics.median(per_token)
            compile_cost = statistics.median(compile_ms(lib) for _ in range(ROUNDS))
            overhead = cost * rows / 1000 / decode_ms
            print(
                f"{rows:>4} {lib.name:<11} {cost:>13.1f} {min(per_token):>7.1f}-"
                f"{max(per_token):<8.1f} {compile_cost:>11.2f} {overhead:>14.1%}"
            )
            report[f"{lib.name}/rows={rows}"] = summarize(samples[lib.name]) | {
                "us_per_token_per_row": cost,
                "compile_ms": compile_cost,
                "decode_step_ms": decode_ms,
                "overhead_vs_decode_step": overhead,
            }
    meta = {"document_tokens": len(tokens), "vocab": vocab, "rounds": ROUNDS}
    meta |= {name: version(name) for name in ("xgrammar", "llguidance")}
    write_json("structured_outputs", meta | {"results": report})


def _decode_step_ms(engine: Engine, rows: int) -> float:
    """Median milliseconds of one decode step of `rows` rows after a 32-token prompt."""
    lora = LoraBatch.build([None] * rows, engine.linear_shapes, dtype=engine.dtype)
    ids = torch.randint(3, 3000, (rows, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    _, cache = engine.forward(ids, mask, (mask.cumsum(-1) - 1), None, lora)
    samples = []
    for step in range(20):
        mask = torch.ones((rows, 33 + step), dtype=torch.long)
        positions = mask.sum(-1, keepdim=True) - 1
        started = time.perf_counter()
        engine.forward(ids[:, :1], mask, positions, cache, lora)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


if __name__ == "__main__":
    main()
