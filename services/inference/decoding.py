"""Iteration-level batched decoding: sequences join and leave a running batch between tokens.

A `DecodeBatch` holds the rows being generated: one shared KV cache, left-padded so every
row's newest token sits in the last column, an attention mask hiding the padding, and each
row's own position. New sequences are prefilled together and merged in; finished ones are
dropped and the padding no row needs any more is cut off. Each row may use a different
adapter (services.inference.lora_batch). All of this runs on the model thread.

The batch is data; the model is a `ModelRunner` it is handed (the engine): one forward pass
over plain tensors, nothing more. Rows share a forward pass but never their failures: a row
whose logits are not finite fails alone, and a forward pass that raises is retried on halves
of the batch until the rows that cause it are found and failed, so one tenant's bad numbers
never fail another tenant's request. A row with a structured output carries its grammar
(services.inference.grammar): its logits are masked before sampling; other rows are not
touched.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from services.common.errors import FailedPrecondition, LoraplexError, Unavailable
from services.inference.grammar import RowGrammar, mask_logits
from services.inference.lora import LoraWeights
from services.inference.lora_batch import LoraBatch

log = logging.getLogger(__name__)


class ModelRunner(Protocol):
    """What decoding needs of the model (services.inference.engine.Engine)."""

    device: torch.device
    pad_token_id: int
    eos_token_id: int

    def lora_batch(self, row_adapters: list[LoraWeights | None]) -> LoraBatch: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        lora: LoraBatch,
        all_positions: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """(each row's logits for its last position, or for every position when
        `all_positions`; the KV cache extended in place)."""
        ...

    def detokenize(self, tokens: list[int]) -> str: ...


def non_finite_output() -> LoraplexError:
    return FailedPrecondition(
        "the adapter produced non-finite numbers (NaN or infinity) for this request; "
        "check its weights and composition weights",
        reason="NON_FINITE_OUTPUT",
    )


def grammar_error() -> LoraplexError:
    return Unavailable(
        "structured output could not follow its grammar; retry", reason="GRAMMAR_ERROR"
    )


def model_error() -> LoraplexError:
    return Unavailable("generation failed on the model; retry", reason="MODEL_ERROR")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Generate exactly max_new_tokens even past end-of-sequence (benchmarks, as vLLM's).
    ignore_eos: bool = False
    # Record each generated token's log-probability detail (TokenLogprob) with this many
    # alternatives; None records none. The model's own distribution, before temperature.
    top_logprobs: int | None = None
    # Record the prompt tokens' too (OpenAI's echo); with max_new_tokens 0, only those.
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability (None: the first prompt token, which nothing predicts)
    and the most likely (token id, log-probability) pairs at its position."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] = field(default_factory=list)
    token_entropies: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    # With SamplingConfig.top_logprobs / prompt_logprobs set: one per token.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.token_logprobs)

    @property
    def mean_token_entropy(self) -> float:
        return (
            sum(self.token_entropies) / len(self.token_entropies) if self.token_entropies else 0.0
        )

    @property
    def mean_logprob(self) -> float:
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else 0.0

    @property
    def min_token_prob(self) -> float:
        return math.exp(min(self.token_logprobs)) if self.token_logprobs else 0.0


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Greedy at temperature 0; else temperature + nucleus (top-p) sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class DecodeSequence:
    """One request's decoding state: its tokens, text so far, and why it stopped."""

    def __init__(
        self,
        prompt_ids: list[int],
        adapter: LoraWeights | None,
        config: SamplingConfig,
        grammar: RowGrammar | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.config = config
        self.grammar = grammar  # structured output: tokens are masked by it
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.entropies: list[float] = []
        # Where the text ended after each token (streaming hands a token's detail out with
        # the last of its text; token_texts() cuts the text at these points).
        self.text_ends: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length" | "error"
        self.error: LoraplexError | None = None
        self.started_at = 0.0
        self.first_token_at = 0.0
        self.finished_at = 0.0
        self._longest_stop = max((len(s) for s in config.stop), default=0)
        # Only when asked: per-token detail.
        self.details: list[TokenLogprob] | None = None
        if config.top_logprobs is not None:
            self.details = []
        self.prompt_details: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, error: LoraplexError) -> None:
        """This row cannot go on; the request gets `error`, the other rows are untouched."""
        self.error = error
        self._finish("error")

    @property
    def tokens_left(self) -> int:
        return self.config.max_new_tokens - len(self.logprobs)

    def accept(
        self,
        token: int,
        logprob: float,
        entropy: float,
        eos_token_id: int,
        detokenize,
        top: tuple[tuple[int, float], ...] = (),
    ) -> None:
        """Take the next sampled token; sets finish_reason when the sequence is done."""
        if not self.logprobs:
            self.first_token_at = time.perf_counter()
        if self.grammar is not None and not self.grammar.accept(token):
            self.fail(grammar_error())
            return
        self.logprobs.append(logprob)
        self.entropies.append(entropy)
        end_of_sequence = token == eos_token_id and not self.config.ignore_eos
        previous = len(self.text)
        if not end_of_sequence:
            self.tokens.append(token)
            self.text = detokenize(self.tokens)
        self.text_ends.append(len(self.text))
        if self.details is not None:
            self.details.append(TokenLogprob(token, logprob, top))
        if end_of_sequence:
            # A row the budget made close early was cut short all the same.
            self._finish("length" if self.grammar and self.grammar.forced_close else "stop")
            return
        start = max(0, previous - self._longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.config.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._finish("stop")
        elif self.tokens_left <= 0:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.finished_at = time.perf_counter()

    def finish_prompt_only(self) -> None:
        """Nothing to generate (max_new_tokens 0): the prompt's scores were the work."""
        self._finish("length")

    def details_through(self, text_end: int) -> int:
        """How many token details belong to text up to `text_end` (all, once finished)."""
        return len(self.details) if self.finished else bisect_right(self.text_ends, text_end)

    def stable_text_length(self) -> int:
        """How much of the text is final: a stop string may still cut the tail, and a
        trailing replacement character is an incomplete multi-byte character."""
        if self.finished:
            return len(self.text)
        end = len(self.text) - max(0, self._longest_stop - 1)
        while end > 0 and self.text[end - 1] == "\ufffd":
            end -= 1
        return max(end, 0)

    def token_texts(self) -> list[str]:
        """The text each token added, joined the final text: '' for end-of-sequence, past a
        stop string's cut, and for a byte whose character only the next token completes."""
        pieces, start = [], 0
        for end in self.text_ends:
            end = min(max(end, start), len(self.text))
            pieces.append(self.text[start:end])
            start = end
        return pieces

    def result(self) -> Generation:
        return Generation(
            text=self.text,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.logprobs),
            token_logprobs=self.logprobs,
            token_entropies=self.entropies,
            token_texts=self.token_texts(),
            time_to_first_token=(self.first_token_at or self.finished_at) - self.started_at,
            total_seconds=self.finished_at - self.started_at,
            logprobs=self.details,
            prompt_logprobs=self.prompt_details,
        )


class DecodeBatch:
    """The running rows of continuous batching and their shared, left-padded KV cache."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.rows: list[DecodeSequence] = []
        self._cache = None  # transformers Cache, batch dim = rows
        self._mask: torch.Tensor | None = None  # (rows, columns): 1 = real token
        self._next: torch.Tensor | None = None  # (rows, 1): each row's next input token
        self._lora: LoraBatch | None = None  # per-row adapters of the current rows

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, sequences: Sequence[DecodeSequence]) -> None:
        """Prefill new sequences (together, left-padded) and merge them into the batch.
        Each gets its first token, or fails alone (`error` set) if its prefill does."""
        for seq in sequences:
            seq.started_at = seq.started_at or time.perf_counter()
        # Scoring prompts needs logits at every position: only those rows pay for them.
        scored = [s for s in sequences if s.config.prompt_logprobs]
        plain = [s for s in sequences if not s.config.prompt_logprobs]
        for group in (plain, scored):
            if group:
                self._prefill_isolating(group)

    def _prefill_isolating(self, sequences: list[DecodeSequence]) -> None:
        try:
            self._prefill(sequences)
        except Exception:
            if len(sequences) == 1:
                log.exception("prefill failed; failing its request only")
                sequences[0].fail(model_error())
                return
            half = len(sequences) // 2
            self._prefill_isolating(sequences[:half])
            self._prefill_isolating(sequences[half:])

    def _prefill(self, sequences: list[DecodeSequence]) -> None:
        runner = self.runner
        width = max(len(s.prompt_ids) for s in sequences)
        ids = torch.full((len(sequences), width), runner.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[i, width - len(seq.prompt_ids) :] = 1
        ids, mask = ids.to(runner.device), mask.to(runner.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lora = runner.lora_batch([s.adapter for s in sequences])
        if sequences[0].config.prompt_logprobs:  # add() groups rows that score prompts
            logits, cache = runner.forward(ids, mask, positions, None, lora, all_positions=True)
            _score_prompts(sequences, logits)
            logits = logits[:, -1]
        else:
            logits, cache = runner.forward(ids, mask, positions, None, lora)
        tokens = self._sample(sequences, logits)
        self._merge(sequences, cache, mask, tokens, lora)

    @torch.inference_mode()
    def step(self) -> None:
        """Decode one token for every running row. Rows whose forward pass fails are failed
        (`error` set) and left for remove_finished; the others advance as if alone."""
        if not self.rows:
            return
        before = [(layer.keys, layer.values) for layer in self._cache.layers]
        try:
            self._step()
        except Exception:
            # The cache grows by new tensors (never in place): put the old ones back.
            for layer, (keys, values) in zip(self._cache.layers, before, strict=True):
                layer.keys, layer.values = keys, values
            if len(self.rows) == 1:
                log.exception("decode step failed; failing its request only")
                self.rows[0].fail(model_error())
                self._pad_failed_row()
                return
            half = len(self.rows) // 2
            first, second = self._take(range(half)), self._take(range(half, len(self.rows)))
            first.step()
            second.step()
            self._replace(first)
            self._merge(second.rows, second._cache, second._mask, second._next[:, 0], second._lora)

    def _step(self) -> None:
        mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        logits, cache = self.runner.forward(self._next, mask, positions, self._cache, self._lora)
        self._cache, self._mask = cache, mask
        self._next = self._sample(self.rows, logits).unsqueeze(1)

    def _pad_failed_row(self) -> None:
        """Keep a failed row's columns in step with the rows that advanced (masked out)."""
        self._mask = _pad(self._mask, self._mask.shape[1] + 1, left=False)
        for layer in self._cache.layers:
            width = layer.keys.shape[2] + 1
            layer.keys = _pad(layer.keys, width, left=False)
            layer.values = _pad(layer.values, width, left=False)

    def _take(self, rows: range) -> DecodeBatch:
        """A separate batch of these rows (this one is left as it is)."""
        part = DecodeBatch(self.runner)
        index = torch.tensor(list(rows), device=self.runner.device)
        part.rows = [self.rows[i] for i in rows]
        part._cache = copy.copy(self._cache)
        part._cache.layers = [copy.copy(layer) for layer in self._cache.layers]
        part._cache.batch_select_indices(index)
        part._mask, part._next = self._mask[index], self._next[index]
        part._lora = self._lora.select(index)
        return part

    def _replace(self, other: DecodeBatch) -> None:
        self.rows, self._cache, self._mask = other.rows, other._cache, other._mask
        self._next, self._lora = other._next, other._lora

    def remove_finished(self, also: set[DecodeSequence] | None = None) -> list[DecodeSequence]:
        """Drop finished rows (failed ones too), and the rows in `also` (e.g. cancelled)."""
        also = also or set()
        keep = [i for i, s in enumerate(self.rows) if not s.finished and s not in also]
        if len(keep) == len(self.rows):
            return []
        kept = set(keep)
        gone = [s for i, s in enumerate(self.rows) if i not in kept]
        if not keep:
            self.rows, self._cache, self._mask, self._next, self._lora = [], None, None, None, None
            return gone
        index = torch.tensor(keep, device=self.runner.device)
        self._cache.batch_select_indices(index)
        self._mask, self._next = self._mask[index], self._next[index]
        self._lora = self._lora.select(index)
        self.rows = [self.rows[i] for i in keep]
        # Columns that are padding in every remaining row are dead weight: cut them.
        dead = int((self._mask.cumsum(-1) == 0).all(0).sum())
        if dead:
            self._mask = self._mask[:, dead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, dead:], layer.values[:, :, dead:]
        return gone

    def _merge(
        self, new: list[DecodeSequence], cache, mask: torch.Tensor, tokens, lora: LoraBatch
    ) -> None:
        if not self.rows:
            self.rows, self._cache, self._mask, self._lora = new, cache, mask, lora
            self._next = tokens.unsqueeze(1)
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_pad(self._mask, width), _pad(mask, width)])
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad(mine.keys, width), _pad(theirs.keys, width)])
                mine.values = torch.cat([_pad(mine.values, width), _pad(theirs.values, width)])
            self._next = torch.cat([self._next, tokens.unsqueeze(1)])
            self._lora = self._lora.concat(lora)
            self.rows = self.rows + new

    def _sample(self, rows: Sequence[DecodeSequence], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token and record its statistics. Uncertainty is measured on
        the model's own distribution, whatever the sampling settings, so scores compare. A
        row whose logits are not all finite fails here, alone."""
        logits = logits.float()
        finite = torch.isfinite(logits).all(-1).tolist()
        logp = torch.log_softmax(logits, dim=-1)
        entropies = (-(logp.exp() * logp).sum(-1)).tolist()
        constrained = [
            i for i, s in enumerate(rows) if s.grammar is not None and finite[i] and not s.finished
        ]
        if constrained:  # structured output: disallowed tokens at -inf, for those rows only
            logits = mask_logits(logits, constrained, [rows[i].grammar for i in constrained])
        greedy = torch.argmax(logits, dim=-1).tolist()
        tokens = [
            greedy[i]
            if seq.finished or not finite[i] or seq.config.temperature == 0
            else sample_token(logits[i], seq.config.temperature, seq.config.top_p, seq.generator)
            for i, seq in enumerate(rows)
        ]
        for i in constrained:  # near the end of its budget a row closes its document
            tokens[i] = rows[i].grammar.within_budget(tokens[i], rows[i].tokens_left)
        chosen = logp[torch.arange(len(rows)), torch.tensor(tokens, device=logp.device)].tolist()
        top = _top_logprobs(logp, [seq.config.top_logprobs for seq in rows])
        runner = self.runner
        for i, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            if seq.finished:
                continue
            if not finite[i]:
                seq.fail(non_finite_output())
                continue
            seq.accept(
                token, chosen[i], entropies[i], runner.eos_token_id, runner.detokenize, top[i]
            )
        return torch.tensor(tokens, device=runner.device)


def _top_logprobs(
    logp: torch.Tensor, wanted: Sequence[int | None]
) -> list[tuple[tuple[int, float], ...]]:
    """Each row's `wanted` most likely (token, log-probability) pairs, most likely first;
    one top-k over the rows when any asks, nothing at all when none does."""
    k = max((w or 0 for w in wanted), default=0)
    if k == 0:
        return [()] * len(wanted)
    values, ids = (t.tolist() for t in torch.topk(logp, k, dim=-1))
    return [
        tuple(zip(ids[i][: w or 0], values[i][: w or 0], strict=True)) for i, w in enumerate(wanted)
    ]


def _score_prompts(sequences: Sequence[DecodeSequence], logits: torch.Tensor) -> None:
    """Record each prompt token's log-probability given the tokens before it, from the
    prefill's logits at every (left-padded) position; the first token has none. A row that
    asks for no new tokens is then finished."""
    width = logits.shape[1]
    for row, seq in enumerate(sequences):
        ids = seq.prompt_ids
        # Position t predicts token t + 1: the prompt's positions but its last.
        logp = torch.log_softmax(logits[row, width - len(ids) : width - 1].float(), dim=-1)
        targets = torch.tensor(ids[1:], dtype=torch.long, device=logp.device)
        chosen = logp[torch.arange(len(ids) - 1, device=logp.device), targets].tolist()
        top = _top_logprobs(logp, [seq.config.top_logprobs] * (len(ids) - 1))
        seq.prompt_details = [TokenLogprob(ids[0], None)] + [
            TokenLogprob(token, value, alternatives)
            for token, value, alternatives in zip(ids[1:], chosen, top, strict=True)
        ]
        if seq.config.max_new_tokens == 0:
            seq.finish_prompt_only()


def _pad(t: torch.Tensor, width: int, left: bool = True) -> torch.Tensor:
    """Zero-pad dimension 1 of a mask (rows, cols) or dimension 2 of a cache tensor
    (rows, heads, cols, dim) to `width` columns, on the left (or right)."""
    dim = 1 if t.dim() == 2 else 2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    zeros = t.new_zeros(shape)
    return torch.cat([zeros, t] if left else [t, zeros], dim=dim)
