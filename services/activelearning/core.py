"""The active-learning domain layer: validation, scoring, selection, the feedback workflow,
export and agreement. No gRPC here; storage is services.activelearning.queue."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import prometheus_client
import redis.asyncio as aioredis

from services.activelearning import export, selection
from services.activelearning.agreement import krippendorff_alpha
from services.activelearning.dispersion import sample_scores
from services.activelearning.embedder import ModelEmbedder
from services.activelearning.forward import FeedbackForwarder
from services.activelearning.queue import (
    SELECTED_BASE,
    Answer,
    FeedbackQueue,
    Item,
    Lease,
    StoredCandidate,
    prompt_hash,
)
from services.activelearning.sampler import Sampler, SampleRequest
from services.activelearning.scores import (
    COLUMN,
    CandidateError,
    UncertaintyMethod,
    parse_method,
    score_tokens,
)
from services.activelearning.selection import Strategy, parse_strategy, text_embedding
from services.activelearning.settings import ActiveLearningSettings
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.names import (
    LABEL,
    MAX_UNIT_ID,
    RECORD_ID,
    check_adapter_name,
    check_tenant,
)

log = logging.getLogger(__name__)

_REVIEWER = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
FEEDBACK_KINDS = ("rating", "thumbs", "pairwise", "corrected_text")

CANDIDATES = prometheus_client.Counter(
    "loraplex_activelearning_candidates_total",
    "Candidates by outcome (accepted, duplicate, rejected).",
    ["outcome"],
)
EMBEDDINGS = prometheus_client.Counter(
    "loraplex_activelearning_embeddings_total",
    "Candidate embeddings by final source: caller (sent with the candidate), model "
    "(inference Embed, in the background), ngram (hashed n-grams: no inference configured), "
    "ngram_fallback (inference failed, timed out or the backlog was full).",
    ["source"],
)
FEEDBACK = prometheus_client.Counter(
    "loraplex_activelearning_feedback_total", "Feedback answers recorded, by kind.", ["kind"]
)


@dataclass
class CandidateIn:
    """One candidate as a caller submits it."""

    output: str
    token_logprobs: Sequence[float]
    token_entropies: Sequence[float]
    prompt: str = ""
    id: str = ""
    adapter: str = ""
    version: int = 0
    experiment: str = ""
    variant: str = ""
    unit_id: str = ""
    token_margins: Sequence[float] = ()
    embedding: Sequence[float] = ()
    token_texts: Sequence[str] = ()


@dataclass
class SubmitResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


@dataclass
class SelectResult:
    items: list[Item]
    method: UncertaintyMethod
    pool_size: int
    near_duplicates: int


@dataclass
class Feedback:
    """One answer: kind is rating (int 1-5), thumbs (bool), pairwise (other_item_id and
    preferred_item_id) or corrected_text (str)."""

    kind: str
    rating: int = 0
    thumbs_up: bool = False
    other_item_id: str = ""
    preferred_item_id: str = ""
    corrected_text: str = ""
    comment: str = ""


@dataclass
class Export:
    jsonl: bytes
    rows: int
    records: int
    truncated: bool


def _embedding_text(c: StoredCandidate) -> str:
    return c.prompt + "\n" + c.output


def check_reviewer(reviewer: str) -> str:
    if not _REVIEWER.fullmatch(reviewer or ""):
        raise InvalidArgument(
            "reviewer must be 1-128 characters of letters, digits, '.', '_', ':', '@' or '-'",
            reason="INVALID_REVIEWER",
        )
    return reviewer


class ActiveLearningCore:
    def __init__(
        self,
        settings: ActiveLearningSettings,
        redis: aioredis.Redis,
        forwarder: FeedbackForwarder | None = None,
        embedder: ModelEmbedder | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = FeedbackQueue(redis, settings.retention_seconds)
        self.forwarder = forwarder
        self.embedder = embedder
        self.sampler = sampler
        self._embed_jobs: asyncio.Queue[tuple[str, list[str], list[str]]] | None = None
        self._embed_task: asyncio.Task | None = None
        self.default_method = parse_method(settings.default_method)
        self.shortlist_method = parse_method(settings.shortlist_method)
        if self.shortlist_method.sampled:
            raise ValueError("shortlist_method must be a token method (entropy ... nll)")
        # Auto-queued items are ordered on arrival, before anything is sampled.
        self.queue_method = (
            self.shortlist_method if self.default_method.sampled else self.default_method
        )
        if settings.reviews_per_item < 1:
            raise ValueError("reviews_per_item must be at least 1")
        if settings.shortlist_factor < 1 or settings.max_sampled_candidates < 1:
            raise ValueError("shortlist_factor and max_sampled_candidates must be at least 1")

    async def ping(self) -> None:
        await self.redis.ping()

    def method(self, method: UncertaintyMethod | str | None) -> UncertaintyMethod:
        return self.default_method if not method else parse_method(method)

    # --- candidates ---------------------------------------------------------------------

    def _prepare(self, c: CandidateIn) -> StoredCandidate:
        """The candidate scored and ready to store; CandidateError says why not. Without a
        caller's embedding, `embedding` is empty until `_embed_ngrams` fills it."""
        if c.id and not RECORD_ID.fullmatch(c.id):
            raise CandidateError(
                "id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                reason="INVALID_ID",
            )
        if not c.output.strip():
            raise CandidateError("the output is empty", reason="EMPTY_OUTPUT")
        limit = self.settings.max_text_chars
        if len(c.output) > limit or len(c.prompt) > limit:
            raise CandidateError(
                f"prompt and output are limited to {limit} characters", reason="TEXT_TOO_LONG"
            )
        if c.adapter:
            try:
                check_adapter_name(c.adapter)
            except InvalidArgument as err:
                raise CandidateError(err.message, reason=err.reason) from None
        if not 0 <= c.version < 2**32:
            raise CandidateError("version must be in [0, 2^32)", reason="INVALID_VERSION")
        for label in (c.experiment, c.variant):
            if label and not LABEL.fullmatch(label):
                raise CandidateError(
                    f"invalid experiment or variant {label!r}", reason="INVALID_LABEL"
                )
        if len(c.unit_id) > MAX_UNIT_ID:
            raise CandidateError("unit_id is too long", reason="INVALID_UNIT_ID")
        scores = score_tokens(c.token_logprobs, c.token_entropies, c.token_margins or None)
        if c.token_texts and len(c.token_texts) != len(c.token_entropies):
            raise CandidateError(
                f"{len(c.token_entropies)} tokens but {len(c.token_texts)} token texts",
                reason="LENGTH_MISMATCH",
            )
        dim = self.settings.embedding_dim
        if len(c.embedding):
            embedding = np.asarray(c.embedding, dtype=np.float32)
            if embedding.shape != (dim,):
                raise CandidateError(
                    f"embedding must have {dim} values, got {embedding.size}",
                    reason="EMBEDDING_SIZE",
                )
            if not np.isfinite(embedding).all():
                raise CandidateError("embedding values must be finite", reason="NOT_FINITE")
        else:
            embedding = np.zeros(0, dtype=np.float32)
        method = self.queue_method
        return StoredCandidate(
            id=c.id or f"al-{uuid.uuid4().hex}",
            prompt=c.prompt,
            output=c.output,
            adapter=c.adapter,
            version=c.version,
            experiment=c.experiment,
            variant=c.variant,
            unit_id=c.unit_id,
            rank_values=[scores.rank_value(m) for m in COLUMN],
            scores={m.value: scores.value(m) for m in COLUMN},
            embedding=embedding,
            priority=scores.rank_value(method),
            method=method.value,
            token_entropies=[float(e) for e in c.token_entropies],
            token_texts=list(c.token_texts),
        )

    async def submit(
        self, tenant: str, candidates: Sequence[CandidateIn], *, now: float | None = None
    ) -> SubmitResult:
        check_tenant(tenant)
        limit = self.settings.max_batch_candidates
        if len(candidates) > limit:
            raise InvalidArgument(
                f"{len(candidates)} candidates in one call, at most {limit} are allowed",
                reason="BATCH_TOO_LARGE",
                max_batch_candidates=str(limit),
            )
        result = SubmitResult()
        ready: list[StoredCandidate] = []
        seen: set[str] = set()
        for index, c in enumerate(candidates):
            try:
                stored = self._prepare(c)
            except CandidateError as err:
                result.rejected.append((index, err.reason, err.message))
                continue
            if stored.id in seen:
                result.rejected.append((index, "DUPLICATE_IN_BATCH", "id repeated in the batch"))
                continue
            seen.add(stored.id)
            ready.append(stored)
        missing = self._embed_ngrams(ready)
        added = await self.queue.add(
            tenant,
            ready,
            now=time.time() if now is None else now,
            required=self.settings.reviews_per_item,
            auto_enqueue=self.settings.auto_enqueue,
        )
        new_ids = {stored.id for stored, new in zip(ready, added, strict=True) if new}
        new_missing = [c for c in missing if c.id in new_ids]
        EMBEDDINGS.labels("caller").inc(len(new_ids) - len(new_missing))
        if self.embedder is None:
            EMBEDDINGS.labels("ngram").inc(len(new_missing))
        else:
            self._schedule_model_embeddings(tenant, new_missing)
        for stored, new in zip(ready, added, strict=True):
            result.ids.append(stored.id)
            if new:
                result.accepted += 1
            else:
                result.duplicates += 1
        CANDIDATES.labels("accepted").inc(result.accepted)
        CANDIDATES.labels("duplicate").inc(result.duplicates)
        CANDIDATES.labels("rejected").inc(len(result.rejected))
        return result

    def _embed_ngrams(self, ready: list[StoredCandidate]) -> list[StoredCandidate]:
        """Give the candidates that came without an embedding hashed character n-grams of
        `prompt + "\n" + output` (at once: SubmitCandidates never waits for a model);
        returns those candidates."""
        missing = [c for c in ready if not c.embedding.size]
        dim = self.settings.embedding_dim
        for c in missing:
            c.embedding = text_embedding(_embedding_text(c), dim)
        return missing

    def _schedule_model_embeddings(self, tenant: str, stored: list[StoredCandidate]) -> None:
        """Queue the background replacement of these n-gram embeddings by the model's."""
        if not stored:
            return
        if self._embed_jobs is None or self._embed_jobs.full():
            EMBEDDINGS.labels("ngram_fallback").inc(len(stored))
            log.warning(
                "model embedding not started or its backlog is full, keeping hashed n-grams",
                extra={"tenant": tenant, "candidates": len(stored)},
            )
            return
        job = (tenant, [c.id for c in stored], [_embedding_text(c) for c in stored])
        self._embed_jobs.put_nowait(job)

    def start(self) -> None:
        """Start the background model embedding (with an embedder; inside the event loop)."""
        if self.embedder is not None and self._embed_task is None:
            self._embed_jobs = asyncio.Queue(maxsize=self.settings.embed_backlog_batches)
            self._embed_task = asyncio.create_task(self._embed_worker())

    async def close(self) -> None:
        if self._embed_task is not None:
            self._embed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._embed_task
            self._embed_task = None

    async def embeddings_settled(self) -> None:
        """Wait until every queued background embedding is done (tests, shutdown)."""
        if self._embed_jobs is not None:
            await self._embed_jobs.join()

    async def _embed_worker(self) -> None:
        assert self._embed_jobs is not None and self.embedder is not None
        while True:
            tenant, ids, texts = await self._embed_jobs.get()
            try:
                rows, _ = await self.embedder.embed(tenant, texts)
                if rows is None:
                    EMBEDDINGS.labels("ngram_fallback").inc(len(ids))
                else:
                    await self.queue.set_embeddings(tenant, ids, rows)
                    EMBEDDINGS.labels("model").inc(len(ids))
            except Exception:  # Redis trouble: those candidates keep their n-grams
                log.exception("storing model embeddings failed", extra={"tenant": tenant})
                EMBEDDINGS.labels("ngram_fallback").inc(len(ids))
            finally:
                self._embed_jobs.task_done()

    # --- selection ----------------------------------------------------------------------

    async def select(
        self,
        tenant: str,
        method: UncertaintyMethod | str | None,
        strategy: Strategy | str | None,
        batch_size: int,
        *,
        adapter: str = "",
        dry_run: bool = False,
    ) -> SelectResult:
        check_tenant(tenant)
        chosen_method = self.method(method)
        chosen_strategy = parse_strategy(strategy or Strategy.TOP_K)
        if adapter:
            check_adapter_name(adapter)
        selection.check_batch_size(batch_size)  # before any read
        pool = await self.queue.open_pool(tenant, self.settings.max_select_pool)
        rows = np.arange(len(pool.ids))
        if adapter:
            rows = np.flatnonzero(np.asarray(pool.adapters, dtype=object) == adapter)
        pool_size = len(rows)
        if chosen_method.sampled:
            rows, values = await self._sampled_values(
                tenant, chosen_method, pool.ids, pool.rank_values, rows, batch_size
            )
        else:
            values = pool.rank_values[rows, COLUMN[chosen_method]]
        picked, skipped = selection.select(
            values,
            pool.embeddings[rows],
            batch_size,
            chosen_strategy,
            hybrid_factor=self.settings.hybrid_pool_factor,
            duplicate_threshold=self.settings.duplicate_threshold,
        )
        ids = [pool.ids[rows[i]] for i in picked]
        if not dry_run:
            k = len(ids)
            await self.queue.enqueue(
                tenant,
                chosen_method.value,
                [(item_id, SELECTED_BASE + (k - rank)) for rank, item_id in enumerate(ids)],
            )
        items = [i for i in await self.queue.items(tenant, ids) if i is not None]
        if not dry_run:
            for item in items:
                item.fields["method"] = chosen_method.value
        return SelectResult(items, chosen_method, pool_size, skipped)

    async def _sampled_values(
        self,
        tenant: str,
        method: UncertaintyMethod,
        ids: list[str],
        rank_values: np.ndarray,
        rows: np.ndarray,
        batch_size: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(the shortlisted rows that have samples, their scores under `method`). The
        shortlist: the shortlist_factor * batch_size rows ranked first by shortlist_method
        (at most max_sampled_candidates); rows sampled before keep their scores, the others
        are sampled now."""
        if self.sampler is None:
            raise FailedPrecondition(
                f"method {method.value} samples answers from the inference service; this "
                "server has no inference_addr",
                reason="SAMPLING_UNAVAILABLE",
            )
        s = self.settings
        size = min(len(rows), s.max_sampled_candidates, s.shortlist_factor * batch_size)
        short = rows[selection.top_k(rank_values[rows, COLUMN[self.shortlist_method]], size)]
        items = await self.queue.items(tenant, [ids[r] for r in short])
        todo = [i for i in items if i is not None and method.value not in i.sampled]
        requests = [
            SampleRequest(i.get("prompt"), i.get("adapter"), int(i.get("version") or 0))
            for i in todo
        ]
        drawn = await self.sampler.sample(tenant, requests)
        fresh = {
            item.id: sample_scores(texts, s.sample_cluster_similarity)
            for item, texts in zip(todo, drawn, strict=True)
            if texts is not None
        }
        await self.queue.set_sampled(tenant, fresh)
        keep, values = [], []
        for row, item in zip(short, items, strict=True):
            if item is None:  # expired meanwhile
                continue
            scores = fresh.get(item.id) or item.sampled
            if method.value in scores:
                keep.append(row)
                values.append(scores[method.value])
        return np.asarray(keep, dtype=np.int64), np.asarray(values, dtype=np.float64)

    # --- the feedback workflow ----------------------------------------------------------

    async def next_item(
        self, tenant: str, reviewer: str, *, now: float | None = None
    ) -> tuple[Lease | None, Item | None]:
        check_tenant(tenant)
        check_reviewer(reviewer)
        lease = await self.queue.lease(
            tenant,
            reviewer,
            secrets.token_urlsafe(16),
            now=time.time() if now is None else now,
            seconds=self.settings.lease_seconds,
        )
        if lease is None:
            return None, None
        return lease, await self.queue.alternative(tenant, lease.item)

    def _check_feedback(self, fb: Feedback) -> None:
        if fb.kind not in FEEDBACK_KINDS:
            raise InvalidArgument(
                f"feedback kind must be one of {', '.join(FEEDBACK_KINDS)}",
                reason="MISSING_FEEDBACK",
            )
        if fb.kind == "rating" and not 1 <= fb.rating <= 5:
            raise InvalidArgument(
                f"rating must be an integer from 1 to 5, got {fb.rating}",
                reason="RATING_OUT_OF_RANGE",
            )
        if fb.kind == "corrected_text":
            if not fb.corrected_text.strip():
                raise InvalidArgument("corrected_text is empty", reason="EMPTY_CORRECTION")
            if len(fb.corrected_text) > self.settings.max_text_chars:
                raise InvalidArgument("corrected_text is too long", reason="TEXT_TOO_LONG")
        if len(fb.comment) > 4096:
            raise InvalidArgument("comment is limited to 4096 characters", reason="TEXT_TOO_LONG")

    async def submit_feedback(
        self,
        tenant: str,
        item_id: str,
        reviewer: str,
        lease_id: str,
        fb: Feedback,
        *,
        now: float | None = None,
    ) -> Answer:
        check_tenant(tenant)
        check_reviewer(reviewer)
        self._check_feedback(fb)
        if not RECORD_ID.fullmatch(item_id or ""):
            raise InvalidArgument("invalid item_id", reason="INVALID_ID")
        item = await self.queue.item(tenant, item_id)
        if item is None:
            raise NotFound(f"item {item_id!r} not found", reason="ITEM_NOT_FOUND")
        now = time.time() if now is None else now
        record: dict[str, Any] = {
            "t": now,
            "item": item_id,
            "reviewer": reviewer,
            "kind": fb.kind,
            **{k: item.get(k) for k in ("prompt", "output", "adapter", "experiment", "variant")},
            "version": int(item.get("version", "0") or 0),
        }
        if fb.comment:
            record["comment"] = fb.comment
        vote, value = "", 0.0
        if fb.kind == "rating":
            record["rating"] = fb.rating
            vote, value = str(fb.rating), float(fb.rating)
        elif fb.kind == "thumbs":
            record["thumbs_up"] = fb.thumbs_up
            vote, value = ("1", 1.0) if fb.thumbs_up else ("0", 0.0)
        elif fb.kind == "corrected_text":
            record["corrected_text"] = fb.corrected_text
        else:
            other = await self._pairwise_other(tenant, item, fb)
            record["other_item"] = other.id
            record["other_output"] = other.get("output")
            record["other_adapter"] = other.get("adapter")
            record["other_variant"] = other.get("variant")
            record["preferred"] = "this" if fb.preferred_item_id == item_id else "other"
        answer = await self.queue.answer(tenant, item_id, reviewer, lease_id, record, vote, now=now)
        if answer.status == "NOT_FOUND":
            raise NotFound(f"item {item_id!r} not found", reason="ITEM_NOT_FOUND")
        if answer.status == "CLOSED":
            raise FailedPrecondition(
                f"item {item_id!r} is closed: it has all the reviews it needs",
                reason="ITEM_CLOSED",
            )
        if answer.status == "EXPIRED":
            raise FailedPrecondition(
                "the lease has expired; lease the item again with NextForFeedback",
                reason="LEASE_EXPIRED",
            )
        if answer.status == "NOT_LEASED":
            raise FailedPrecondition(
                f"item {item_id!r} is not leased to {reviewer!r} under this lease_id",
                reason="LEASE_NOT_HELD",
            )
        FEEDBACK.labels(fb.kind).inc()
        if self.forwarder is not None and vote:
            self.forwarder.feedback(tenant, item, fb.kind, value)
        return answer

    async def _pairwise_other(self, tenant: str, item: Item, fb: Feedback) -> Item:
        if not RECORD_ID.fullmatch(fb.other_item_id or "") or fb.other_item_id == item.id:
            raise InvalidArgument(
                "pairwise feedback names another item of the same prompt (other_item_id)",
                reason="INVALID_PAIRWISE",
            )
        if fb.preferred_item_id not in (item.id, fb.other_item_id):
            raise InvalidArgument(
                "preferred_item_id must be the leased item's id or other_item_id",
                reason="INVALID_PAIRWISE",
            )
        other = await self.queue.item(tenant, fb.other_item_id)
        if other is None:
            raise NotFound(f"item {fb.other_item_id!r} not found", reason="ITEM_NOT_FOUND")
        if other.get("phash") != prompt_hash(item.get("prompt")):
            raise InvalidArgument(
                "a pairwise preference compares two outputs of the same prompt; "
                f"{item.id!r} and {other.id!r} answer different prompts",
                reason="PAIRWISE_PROMPT_MISMATCH",
            )
        return other

    # --- export and statistics ----------------------------------------------------------

    async def export(
        self,
        tenant: str,
        fmt: export.DatasetFormat | str,
        *,
        adapter: str = "",
        start: float | None = None,
        end: float | None = None,
    ) -> Export:
        check_tenant(tenant)
        chosen = export.parse_format(fmt)
        if adapter:
            check_adapter_name(adapter)
        for bound in (start, end):
            if bound is not None and not math.isfinite(bound):
                raise InvalidArgument("time bounds must be finite", reason="INVALID_TIME")
        if start is not None and end is not None and end < start:
            raise InvalidArgument("end_time is before start_time", reason="INVALID_TIME")
        records, truncated = await self.queue.feedback_records(
            tenant, start, end, self.settings.export_max_records
        )
        if adapter:
            records = [r for r in records if r["adapter"] == adapter]
        rows = list(export.rows(records, chosen))
        return Export(export.to_jsonl(rows), len(rows), len(records), truncated)

    async def stats(self, tenant: str, *, now: float | None = None) -> dict[str, Any]:
        check_tenant(tenant)
        counts = await self.queue.counts(tenant, time.time() if now is None else now)
        ratings = [v for v in counts.pop("ratings") if len(v) >= 2]
        thumbs = [v for v in counts.pop("thumbs") if len(v) >= 2]
        counts["rating_alpha"] = krippendorff_alpha(ratings, "interval")
        counts["thumbs_alpha"] = krippendorff_alpha(thumbs, "nominal")
        counts["rating_items"] = len(ratings)
        counts["thumbs_items"] = len(thumbs)
        return counts
