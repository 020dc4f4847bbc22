"""The library API: `from services import ActiveLearningSelector, UncertaintyMethod,
select_for_feedback`.

In-process scoring and selection (no server, no Redis), with the same scores, strategies and
errors (services.common.errors) as the active-learning service:

    selector = ActiveLearningSelector(method="entropy")
    uncertain = selector.select_uncertain_examples(candidates=outputs, logits=output_logits)
    for example in uncertain:
        print(example.priority, example.prompt, example.model_output, example.score)

    batch = select_for_feedback(model_outputs=outputs, method="margin", batch_size=10)

A candidate is a mapping or an object with `output` (or `model_output` / `text`), and
optionally `prompt`, `id`, `adapter`, `token_logprobs` + `token_entropies` (as the inference
service and the gateway's `loraplex` reply object return them), `token_margins`,
`token_ids` (the generated tokens, for logits), `embedding`, and `samples` (K >= 2 more
answers sampled for the same prompt: the sample_* methods need them). With logits (one
[tokens, vocab] array per candidate, None where a candidate brings token statistics
instead), margin is exact and chosen tokens are `token_ids`, else each row's argmax.

A bad candidate (NaN/inf logits, no tokens, mismatched lengths, an empty output) is
reported in `Selection.rejected` with its index and reason; the others are still ranked.
Errors of the call itself raise InvalidArgument: an unknown method, logits for a different
number of candidates, batch_size <= 0, or no valid candidate at all. A batch_size larger
than the valid candidates returns all of them, ranked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from services.activelearning.dispersion import sample_scores
from services.activelearning.scores import (
    CandidateError,
    Scores,
    UncertaintyMethod,
    parse_method,
    score_logits,
    score_tokens,
)
from services.activelearning.selection import (
    Strategy,
    parse_strategy,
    select,
    text_embedding,
)
from services.common.errors import InvalidArgument

__all__ = [
    "ActiveLearningSelector",
    "Rejected",
    "SelectedExample",
    "Selection",
    "UncertaintyMethod",
    "select_for_feedback",
]


@dataclass(frozen=True)
class SelectedExample:
    prompt: str
    model_output: str
    # The selecting method's score (higher: more uncertain) and every method's.
    score: float
    scores: Scores
    # 1 for the example most worth a reviewer's time, then 2, 3, ...
    priority: int
    # Position in the candidates passed in.
    index: int
    id: str = ""
    adapter: str = ""
    candidate: Any = None


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: str
    message: str


@dataclass
class Selection(Sequence[SelectedExample]):
    """The selected examples in priority order (iterate, index, len), plus what was left
    out: bad candidates (`rejected`) and near-duplicates of selected ones."""

    examples: list[SelectedExample]
    method: UncertaintyMethod
    rejected: list[Rejected] = field(default_factory=list)
    near_duplicates: int = 0

    def __getitem__(self, i):  # type: ignore[override]
        return self.examples[i]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[SelectedExample]:
        return iter(self.examples)


def _field(candidate: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(candidate, Mapping):
            if name in candidate:
                return candidate[name]
        elif hasattr(candidate, name):
            return getattr(candidate, name)
    return default


class ActiveLearningSelector:
    def __init__(
        self,
        method: UncertaintyMethod | str = UncertaintyMethod.ENTROPY,
        *,
        strategy: Strategy | str = Strategy.TOP_K,
        duplicate_threshold: float = 0.9,
        hybrid_pool_factor: int = 10,
        embedding_dim: int = 256,
    ) -> None:
        self.method = parse_method(method)
        self.strategy = parse_strategy(strategy)
        self.duplicate_threshold = duplicate_threshold
        self.hybrid_pool_factor = hybrid_pool_factor
        self.embedding_dim = embedding_dim

    def score(
        self, candidates: Sequence[Any], logits: Sequence[Any] | None = None
    ) -> tuple[list[Scores | None], list[Rejected]]:
        """Every method's scores per candidate (None for a rejected one), and the rejects."""
        if logits is not None and len(logits) != len(candidates):
            raise InvalidArgument(
                f"{len(logits)} logits arrays for {len(candidates)} candidates",
                reason="LENGTH_MISMATCH",
            )
        scores: list[Scores | None] = []
        rejected: list[Rejected] = []
        for i, c in enumerate(candidates):
            try:
                output = _field(c, "output", "model_output", "text", default="")
                if not isinstance(output, str) or not output.strip():
                    raise CandidateError("the output is empty", reason="EMPTY_OUTPUT")
                row_logits = None if logits is None else logits[i]
                if row_logits is not None:
                    scores.append(score_logits(row_logits, _field(c, "token_ids")))
                else:
                    lp = _field(c, "token_logprobs")
                    ent = _field(c, "token_entropies")
                    if lp is None or ent is None:
                        raise CandidateError(
                            "a candidate needs logits or token_logprobs and token_entropies",
                            reason="MISSING_TOKEN_STATS",
                        )
                    scores.append(score_tokens(lp, ent, _field(c, "token_margins")))
                samples = _field(c, "samples")
                if samples is not None and len(samples) >= 2:
                    scores[-1] = replace(scores[-1], sampled=sample_scores(list(samples)))
            except CandidateError as err:
                scores.append(None)
                rejected.append(Rejected(i, err.reason, err.message))
        return scores, rejected

    def select_uncertain_examples(
        self,
        candidates: Sequence[Any],
        logits: Sequence[Any] | None = None,
        *,
        batch_size: int | None = None,
        method: UncertaintyMethod | str | None = None,
        strategy: Strategy | str | None = None,
    ) -> Selection:
        """The batch_size candidates most worth feedback (all valid ones when None), most
        uncertain (TOP_K) or most representative (DIVERSE, HYBRID) first."""
        chosen = parse_method(method) if method is not None else self.method
        how = parse_strategy(strategy) if strategy is not None else self.strategy
        scores, rejected = self.score(candidates, logits)
        if chosen.sampled:
            for i, s in enumerate(scores):
                if s is not None and not s.sampled:
                    scores[i] = None
                    rejected.append(
                        Rejected(i, "MISSING_SAMPLES", f"{chosen} needs >= 2 samples per candidate")
                    )
            rejected.sort(key=lambda r: r.index)
        valid = [i for i, s in enumerate(scores) if s is not None]
        if not valid:
            raise InvalidArgument(
                f"none of the {len(candidates)} candidates can be scored"
                + (f" (first: {rejected[0].reason})" if rejected else ""),
                reason="NO_VALID_CANDIDATES",
            )
        k = len(valid) if batch_size is None else batch_size
        values = np.array([scores[i].rank_value(chosen) for i in valid])  # type: ignore[union-attr]
        vectors = [self._embedding(candidates[i]) for i in valid]
        if len({v.shape for v in vectors}) > 1:
            raise InvalidArgument(
                "candidates' embeddings differ in size (those without one get "
                f"{self.embedding_dim} values)",
                reason="EMBEDDING_SIZE",
            )
        embeddings = np.stack(vectors)
        picked, skipped = select(
            values,
            embeddings,
            k,
            how,
            hybrid_factor=self.hybrid_pool_factor,
            duplicate_threshold=self.duplicate_threshold,
        )
        examples = []
        for rank, row in enumerate(picked, start=1):
            i = valid[row]
            c, s = candidates[i], scores[i]
            assert s is not None
            examples.append(
                SelectedExample(
                    prompt=_field(c, "prompt", default=""),
                    model_output=_field(c, "output", "model_output", "text"),
                    score=s.value(chosen),
                    scores=s,
                    priority=rank,
                    index=i,
                    id=str(_field(c, "id", default="")),
                    adapter=str(_field(c, "adapter", default="")),
                    candidate=c,
                )
            )
        return Selection(examples, chosen, rejected, skipped)

    def _embedding(self, candidate: Any) -> np.ndarray:
        given = _field(candidate, "embedding")
        if given is not None and len(given):
            return np.asarray(given, dtype=np.float32)
        text = _field(candidate, "prompt", default="") + "\n"
        text += _field(candidate, "output", "model_output", "text", default="")
        return text_embedding(text, self.embedding_dim)


def select_for_feedback(
    model_outputs: Sequence[Any],
    method: UncertaintyMethod | str = UncertaintyMethod.ENTROPY,
    batch_size: int = 10,
    *,
    strategy: Strategy | str = Strategy.TOP_K,
    logits: Sequence[Any] | None = None,
) -> Selection:
    """The batch_size model outputs most worth a human's feedback (the product spec's call)."""
    selector = ActiveLearningSelector(method, strategy=strategy)
    return selector.select_uncertain_examples(model_outputs, logits, batch_size=batch_size)
