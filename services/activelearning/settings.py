"""Active-learning settings: each default written once, here; config/active_learning.yaml
(the product spec's name) overrides it, environment variables (the field name in upper
case) override both."""

from __future__ import annotations

from services.common.settings import ServiceSettings


class ActiveLearningSettings(ServiceSettings):
    yaml_name = "active_learning"

    port: int = 50054
    metrics_port: int = 9154
    # Uncertainty method where a request names none (and the queue order of auto-queued
    # items, unless it is a sampling method: then shortlist_method orders them): entropy,
    # max_entropy, least_confidence, margin, nll, or a sampling method (sample_jaccard,
    # sample_rouge_l, sample_clusters, sample_cluster_entropy, sample_eigv; these need
    # inference_addr).
    default_method: str = "entropy"
    # Sampling methods score only a shortlist: the shortlist_factor * batch_size open
    # candidates ranked first by this token method (which costs nothing more), at most
    # max_sampled_candidates. Each shortlisted candidate costs sample_count more generations
    # (once: its scores are kept); 3 * 10 * 5 = 150 for a batch of 10 with the defaults.
    shortlist_method: str = "margin"
    shortlist_factor: int = 3
    max_sampled_candidates: int = 200
    # Samples per candidate (seeds 1..sample_count, so the same candidate always gets the same
    # samples), their temperature and length. 0.7 found wrong outputs better than 1.0 in
    # bench/eval_active_learning.py (docs/active-learning.md).
    sample_count: int = 5
    sample_temperature: float = 0.7
    sample_max_new_tokens: int = 64
    # Samples with ROUGE-L F1 at least this are one answer (sample_clusters and
    # sample_cluster_entropy).
    sample_cluster_similarity: float = 0.5
    # Generations for one SelectUncertain in flight at once (the inference scheduler batches
    # them), and the longest all of them may take (below the gateway's 120 s request
    # timeout, so that a REST caller gets SAMPLING_TIMEOUT rather than a bare deadline).
    sample_concurrency: int = 64
    sample_timeout_seconds: float = 100.0
    # Every submitted candidate enters the feedback queue at once, ordered by its
    # uncertainty under default_method (False: candidates wait in the pool until
    # SelectUncertain picks them).
    auto_enqueue: bool = True
    # Reviews an item needs before it closes (each from a different reviewer).
    reviews_per_item: int = 1
    # A leased item goes back to the queue when its reviewer has not answered within this.
    lease_seconds: float = 600.0
    # More candidates in one SubmitCandidates: INVALID_ARGUMENT.
    max_batch_candidates: int = 1_000
    # SelectUncertain considers at most this many open candidates (the newest).
    max_select_pool: int = 200_000
    # Hybrid selection runs k-center greedy among the hybrid_pool_factor * k most uncertain.
    hybrid_pool_factor: int = 10
    # Cosine similarity (of embeddings) at or above which a candidate is a near-duplicate.
    duplicate_threshold: float = 0.9
    # Size of candidate embeddings (caller's, model's and hashed n-grams'); with
    # inference_addr it must be the model's hidden size (loraplex-tiny: 256), else the
    # service falls back to hashed n-grams.
    embedding_dim: int = 256
    # Longer prompts or outputs are rejected (TEXT_TOO_LONG).
    max_text_chars: int = 32_000
    # Candidates, queue entries and feedback records expire after this long.
    retention_seconds: int = 30 * 24 * 3600
    # ExportDataset reads at most this many feedback records per call.
    export_max_records: int = 100_000
    # host:port of the analytics / experiments services, where feedback is forwarded, best
    # effort; unset: it is not. `make run` sets both.
    analytics_addr: str | None = None
    experiments_addr: str | None = None
    # Forwarded feedback is sent in batches at least this often (and on shutdown).
    feedback_flush_seconds: float = 1.0
    # host:port of the inference service: sampling methods generate there, and with
    # embed_with_model candidates without an embedding are stored with hashed n-grams, then
    # get the base model's (Embed RPC) in the background; unset, or when that fails, they
    # keep the n-grams.
    inference_addr: str | None = None
    # Off by default: each candidate then costs a forward pass on the model that serves
    # generation (on a 2-core CPU that slowed completions through the gateway several
    # times over). Worth it where the model runs on a GPU.
    embed_with_model: bool = False
    # Longest the background embedding of one SubmitCandidates batch waits; after a failure
    # inference is not asked again for embed_retry_seconds. At most embed_backlog_batches
    # batches wait to be embedded (more keep their n-grams).
    embed_timeout_seconds: float = 30.0
    embed_retry_seconds: float = 30.0
    embed_backlog_batches: int = 1000
