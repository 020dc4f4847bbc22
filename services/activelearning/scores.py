"""Uncertainty scores of generated sequences, from per-token statistics or from logits.

For an output of T tokens with chosen-token log-probabilities l_t and predictive entropies
H_t (nats), every score is "higher = more uncertain":

    entropy           mean_t H_t
    max_entropy       max_t H_t
    least_confidence  1 - exp(sum_t l_t)          (1 - P(output); Culotta & McCallum 2005)
    margin            1 - mean_t (p1_t - p2_t)    (p1, p2: the two largest token probabilities)
    nll               -mean_t l_t                 (length-normalised negative log-likelihood)

least_confidence saturates at 1.0 in float64 once P(output) < 1e-16 (a few dozen tokens), so
rankings use total NLL (-sum_t l_t) instead, which orders candidates identically without
ties (`rank_values`).

Margin needs the second most likely token. From logits it is exact. The inference service
returns only the chosen token's log-probability and the entropy per token, so without
`token_margins` the service approximates p1 - p2 by 2p - 1, p = exp(l_t): exact when the
chosen token was the most likely one and all the other mass sits on one token, otherwise a
lower bound of the margin when the chosen token is the most likely one (the usual case at
low temperature). It is documented as an approximation in docs/active-learning.md.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from services.common.errors import InvalidArgument


class UncertaintyMethod(enum.StrEnum):
    """The product spec's method names: `UncertaintyMethod("entropy")`, `.MARGIN`, ...

    The first five score the served output's tokens (free: inference returns the token
    statistics with every completion). The sample_* ones measure how much K more sampled
    answers to the same prompt disagree (services.activelearning.dispersion): K more
    generations per candidate, so they are computed only when asked for, off the serving
    path, for a shortlist."""

    ENTROPY = "entropy"
    MAX_ENTROPY = "max_entropy"
    LEAST_CONFIDENCE = "least_confidence"
    MARGIN = "margin"
    NLL = "nll"
    SAMPLE_JACCARD = "sample_jaccard"
    SAMPLE_ROUGE_L = "sample_rouge_l"
    SAMPLE_CLUSTERS = "sample_clusters"
    SAMPLE_CLUSTER_ENTROPY = "sample_cluster_entropy"
    SAMPLE_EIGV = "sample_eigv"

    @property
    def sampled(self) -> bool:
        return self.value.startswith("sample_")


TOKEN_METHODS = tuple(m for m in UncertaintyMethod if not m.sampled)
SAMPLING_METHODS = tuple(m for m in UncertaintyMethod if m.sampled)
# Column of each token method in a scores matrix (rows: candidates).
COLUMN = {m: i for i, m in enumerate(TOKEN_METHODS)}


E = TypeVar("E", bound=enum.StrEnum)


def parse_choice(choices: type[E], value: E | str, what: str, reason: str) -> E:
    """value as a member of a StrEnum of names; else InvalidArgument(reason) listing them."""
    try:
        return choices(value)
    except ValueError:
        raise InvalidArgument(
            f"unknown {what} {value!r}; use one of {', '.join(choices)}", reason=reason
        ) from None


def parse_method(method: UncertaintyMethod | str) -> UncertaintyMethod:
    return parse_choice(UncertaintyMethod, method, "uncertainty method", "UNKNOWN_METHOD")


@dataclass(frozen=True, slots=True)
class Scores:
    entropy: float
    max_entropy: float
    least_confidence: float
    margin: float
    nll: float
    tokens: int
    # The sampling-based scores by method name, when samples were drawn.
    sampled: dict[str, float] = field(default_factory=dict)

    def value(self, method: UncertaintyMethod) -> float:
        if method.sampled:
            return self.sampled[method.value]
        return getattr(self, method.value)

    def rank_value(self, method: UncertaintyMethod) -> float:
        """The value rankings sort by: the score, except total NLL for least_confidence."""
        if method is UncertaintyMethod.LEAST_CONFIDENCE:
            return self.nll * self.tokens
        return self.value(method)

    def as_row(self) -> list[float]:
        return [self.entropy, self.max_entropy, self.least_confidence, self.margin, self.nll]


class CandidateError(InvalidArgument):
    """One candidate cannot be scored; a batch reports it and keeps the others."""


def score_tokens(
    logprobs: Sequence[float],
    entropies: Sequence[float],
    margins: Sequence[float] | None = None,
) -> Scores:
    """Scores of one output from per-token chosen log-probabilities, entropies and (optional)
    top-1/top-2 margins. Raises CandidateError for empty, mismatched or non-finite input."""
    lp = np.asarray(logprobs, dtype=np.float64)
    ent = np.asarray(entropies, dtype=np.float64)
    if lp.size == 0:
        raise CandidateError("the output has no tokens to score", reason="EMPTY_OUTPUT")
    if ent.size != lp.size:
        raise CandidateError(
            f"{lp.size} token log-probabilities but {ent.size} entropies",
            reason="LENGTH_MISMATCH",
        )
    if not (np.isfinite(lp).all() and np.isfinite(ent).all()):
        raise CandidateError("token statistics must be finite", reason="NOT_FINITE")
    if (lp > 1e-6).any():
        raise CandidateError("log-probabilities must be <= 0", reason="INVALID_LOGPROB")
    if (ent < -1e-6).any():
        raise CandidateError("entropies must be >= 0", reason="INVALID_ENTROPY")
    lp = np.minimum(lp, 0.0)
    if margins is not None and len(margins):
        mg = np.asarray(margins, dtype=np.float64)
        if mg.size != lp.size:
            raise CandidateError(
                f"{lp.size} tokens but {mg.size} margins", reason="LENGTH_MISMATCH"
            )
        if not np.isfinite(mg).all() or (mg < -1e-6).any() or (mg > 1 + 1e-6).any():
            raise CandidateError("margins must be in [0, 1]", reason="INVALID_MARGIN")
    else:
        mg = np.clip(2 * np.exp(lp) - 1, 0.0, 1.0)
    total = float(lp.sum())
    return Scores(
        entropy=float(ent.mean()),
        max_entropy=float(ent.max()),
        least_confidence=-math.expm1(total),
        margin=1.0 - float(mg.mean()),
        nll=-total / lp.size,
        tokens=int(lp.size),
    )


def token_stats_from_logits(
    logits: np.ndarray, token_ids: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen log-probs, entropies, top-1/top-2 margins) per row of a [T, vocab] logits
    matrix. token_ids are the generated tokens; None takes each row's argmax (greedy).
    -inf logits (masked tokens) have probability 0; NaN or +inf is a CandidateError."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] < 2:
        raise CandidateError(
            f"logits must be a [tokens, vocab] matrix with tokens >= 1 and vocab >= 2, "
            f"got shape {x.shape}",
            reason="EMPTY_OUTPUT" if x.ndim == 2 and x.shape[0] == 0 else "BAD_LOGITS_SHAPE",
        )
    if np.isnan(x).any() or np.isposinf(x).any():
        raise CandidateError("logits contain NaN or +inf", reason="NOT_FINITE")
    top = x.max(axis=1, keepdims=True)
    if not np.isfinite(top).all():
        raise CandidateError("a row of logits is entirely -inf", reason="NOT_FINITE")
    shifted = x - top
    with np.errstate(divide="ignore", invalid="ignore"):
        logz = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        logp = shifted - logz
        p = np.exp(logp)
        entropy = -np.where(p > 0, p * logp, 0.0).sum(axis=1)
    if token_ids is None:
        chosen = np.argmax(x, axis=1)
    else:
        chosen = np.asarray(token_ids, dtype=np.int64)
        if chosen.shape != (x.shape[0],):
            raise CandidateError(
                f"{chosen.size} token ids for {x.shape[0]} rows of logits",
                reason="LENGTH_MISMATCH",
            )
        if (chosen < 0).any() or (chosen >= x.shape[1]).any():
            raise CandidateError("a token id is outside the vocabulary", reason="BAD_TOKEN_ID")
    lp = logp[np.arange(x.shape[0]), chosen]
    if not np.isfinite(lp).all():
        raise CandidateError("a chosen token has probability 0", reason="NOT_FINITE")
    two = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    margins = two[:, 1] - two[:, 0]
    return lp, np.maximum(entropy, 0.0), margins


def score_logits(logits: np.ndarray, token_ids: Sequence[int] | None = None) -> Scores:
    return score_tokens(*token_stats_from_logits(logits, token_ids))


def ragged_scores(logprobs: np.ndarray, entropies: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Vectorised scores of many outputs whose per-token statistics are concatenated
    (lengths[i] tokens each, all >= 1, inputs already validated): a [n, 5] matrix in
    TOKEN_METHODS order, with column least_confidence holding total NLL (its rank value)."""
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    n = lengths.astype(np.float64)
    ent_sum = np.add.reduceat(entropies, starts, dtype=np.float64)
    lp_sum = np.add.reduceat(logprobs, starts, dtype=np.float64)
    margin = np.exp(logprobs, dtype=np.float32)
    margin *= 2
    margin -= 1
    np.clip(margin, 0.0, 1.0, out=margin)
    out = np.empty((len(lengths), len(TOKEN_METHODS)))
    out[:, COLUMN[UncertaintyMethod.ENTROPY]] = ent_sum / n
    out[:, COLUMN[UncertaintyMethod.MAX_ENTROPY]] = np.maximum.reduceat(entropies, starts)
    out[:, COLUMN[UncertaintyMethod.LEAST_CONFIDENCE]] = -lp_sum
    out[:, COLUMN[UncertaintyMethod.MARGIN]] = (
        1.0 - np.add.reduceat(margin, starts, dtype=np.float64) / n
    )
    out[:, COLUMN[UncertaintyMethod.NLL]] = -lp_sum / n
    return out
