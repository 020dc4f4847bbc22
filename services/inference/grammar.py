"""Structured outputs: decoding constrained by a JSON grammar, one matcher per request.

xgrammar (the library vLLM and SGLang use; cheaper per token than llguidance on this
model's vocabulary, bench/bench_structured_outputs.py) compiles a JSON Schema, or "any
JSON object", into a grammar; each constrained row keeps a matcher of that grammar. Before
a row's token is sampled, the matcher's mask sets every token that would break the grammar
to -inf, so the text always parses and validates; end-of-sequence is allowed only where
the document is complete. Output is compact JSON (no free whitespace: a small model could
otherwise fill its budget with spaces).

When the token budget (max_new_tokens) is about to run out, the row is closed instead of
cut: from CLOSE_WINDOW tokens before the end, a sampled token is kept only if the shortest
way to finish the document still fits after it; otherwise the row follows that shortest
way (close the string, the arrays and objects; fill required keys with the smallest
values). Such a row ends with finish_reason "length" (its content was cut short) but its
text still parses and validates. A document whose closing needs more tokens than the
window (or than max_new_tokens) is cut as OpenAI cuts it: "length", invalid JSON.

Rows without a grammar never reach this module: the sampler's hot path is unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import torch
import xgrammar as xgr
from xgrammar import CompiledGrammar

from services.common.errors import InvalidArgument

# The last tokens of a row's budget in which it is checked that it can still close.
CLOSE_WINDOW = 64
# Compiled grammars kept for reuse (requests with the same schema share one).
CACHE_BYTES = 64 * 1024 * 1024
# The closing walk's preferred characters, shortest way out first: end a string, close a
# container, end a value (before a digit, which would only lengthen a number), the
# smallest number, then what separates a key from its value.
_CLOSERS = ('"', "}", "]", ",", "0", ":")
# xgrammar prefixes its messages with "[time] file.cc:line: ".
_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


@dataclass(frozen=True)
class GrammarRequest:
    """What a request constrains its output to: a JSON Schema (its JSON text), or any JSON
    object when json_schema is empty."""

    json_schema: str = ""


def invalid_schema(message: str) -> InvalidArgument:
    return InvalidArgument(
        f"the JSON schema cannot be used for structured output: {message}",
        reason="INVALID_SCHEMA",
    )


class GrammarCompiler:
    """Compiles requests' grammars against the model's tokenizer (thread-safe; cached)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[eos_token_id]
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
        single = {text: i for i, text in enumerate(info.decoded_vocab) if len(text) == 1}
        self._closers = tuple(single[c.encode()] for c in _CLOSERS if c.encode() in single)
        # Compact JSON never holds a raw control character (0x00-0x1f), but xgrammar 0.2's
        # length-bounded strings (maxLength) let them through: such tokens are masked out
        # for every constrained row.
        words = np.full(xgr.allocate_token_bitmask(1, vocab_size).shape[1], 0xFFFFFFFF, np.uint32)
        for token, text in enumerate(info.decoded_vocab):
            if any(byte < 0x20 for byte in text):
                words[token >> 5] &= ~np.uint32(1 << (token & 31))
        self._printable = torch.from_numpy(words.view(np.int32))
        self._lengths = np.zeros(vocab_size, np.int32)  # bytes per token
        self._lengths[: len(info.decoded_vocab)] = [len(text) for text in info.decoded_vocab]

    def compile(self, request: GrammarRequest) -> CompiledGrammar:
        """The grammar, or INVALID_ARGUMENT (INVALID_SCHEMA) with the library's reason."""
        if not request.json_schema:
            # Any object: JSON Schema's open-ended {"type": "object"}, not xgrammar's strict
            # reading of it (no properties at all).
            return self._compile('{"type": "object"}', strict=False)
        try:
            schema = json.loads(request.json_schema)
        except json.JSONDecodeError as err:
            raise invalid_schema(f"not JSON: {err}") from None
        if not isinstance(schema, dict):
            raise invalid_schema("a schema is a JSON object")
        # Strict: properties a schema does not name are not generated (a subset of what it
        # allows, as OpenAI's strict mode requires), so output always validates.
        return self._compile(request.json_schema, strict=True)

    def _compile(self, schema: str, strict: bool) -> CompiledGrammar:
        try:
            return self._compiler.compile_json_schema(
                schema, any_whitespace=False, separators=(",", ":"), strict_mode=strict
            )
        except (RuntimeError, ValueError, TypeError) as err:
            message = _LOCATION.sub("", str(err).strip()).strip() or type(err).__name__
            raise invalid_schema(message) from None

    def row(self, grammar: CompiledGrammar) -> RowGrammar:
        return RowGrammar(
            xgr.GrammarMatcher(grammar), self._closers, self._printable, self._lengths
        )


class RowGrammar:
    """One request's matcher state: which tokens may come next, and the closing walk."""

    def __init__(
        self,
        matcher: xgr.GrammarMatcher,
        closers: tuple[int, ...],
        printable: torch.Tensor,
        lengths: np.ndarray,
    ) -> None:
        self.matcher = matcher
        self.closers = closers
        self.lengths = lengths
        self.vocab = len(lengths)
        self.printable = printable  # bitmask of the tokens without control characters
        self.forced_close = False  # the budget made this row take the closing walk
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab)

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, index)
        bitmask[index] &= self.printable

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def within_budget(self, token: int, tokens_left: int) -> int:
        """`token` (sampled, allowed) if the document can still be finished within the
        budget after it, else the first token of the shortest way to finish it."""
        if tokens_left > CLOSE_WINDOW or self.matcher.is_completed():
            return token  # far from the end, or complete (only end-of-sequence may come)
        if not self.accept(token):  # pragma: no cover - the mask allowed it
            return token
        fits = self._closing_length(tokens_left - 1) <= tokens_left - 1
        self.matcher.rollback(1)
        if fits:
            return token
        walk = self._closing_walk(tokens_left)
        if not walk:  # cannot close in time whatever it does: let it run out
            return token
        self.forced_close = True
        return walk[0]

    def _closing_length(self, limit: int) -> int:
        """Tokens the closing walk needs from here (more than limit: limit + 1)."""
        walk = self._closing_walk(limit)
        return len(walk) if walk or self.matcher.is_completed() else limit + 1

    def _closing_walk(self, limit: int) -> list[int]:
        """The tokens that finish the document from here, at most `limit` of them ([] when
        it is complete already or cannot be finished in time). The matcher is unchanged."""
        walk: list[int] = []
        finished = True
        while not self.matcher.is_completed():
            token = self._closing_token() if len(walk) < limit else None
            if token is None or not self.accept(token):
                finished = False
                break
            walk.append(token)
        if walk:
            self.matcher.rollback(len(walk))
        return walk if finished else []

    def _closing_token(self) -> int | None:
        """The walk's next token: a preferred closer if allowed, else the longest allowed
        token (key names and enum values in as few tokens as the vocabulary allows)."""
        self.fill(self._bitmask, 0)
        bits = self._bitmask[0].numpy().view(np.uint32)
        for token in self.closers:
            if bits[token >> 5] >> (token & 31) & 1:
                return token
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.vocab]
        if not allowed.any():
            return None
        return int(np.argmax(np.where(allowed, self.lengths, -1)))


def mask_logits(logits: torch.Tensor, rows: list[int], grammars: list[RowGrammar]) -> torch.Tensor:
    """A copy of the batch's logits with each constrained row's (`rows`, with their
    `grammars`) disallowed tokens at -inf."""
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row, grammar in zip(rows, grammars, strict=True):
        grammar.fill(bitmask, row)
    masked = logits.clone()
    # On a GPU, plain torch ops: xgrammar's default there is a Triton kernel compiled at run
    # time, which needs a compiler in the image (and is not measured here).
    backend = "cpu" if logits.device.type == "cpu" else "torch_native"
    xgr.apply_token_bitmask_inplace(
        masked, bitmask.to(logits.device), indices=rows, backend=backend
    )
    return masked
