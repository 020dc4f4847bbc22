"""Active learning with model embeddings: a real active-learning server whose candidates are
embedded by a real inference server's Embed RPC (base model, in the background after
SubmitCandidates stored hashed n-grams), and the fallback to hashed
character n-grams when inference is down or its vectors do not fit."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from prometheus_client import REGISTRY

from loraplex.activelearning.v1 import activelearning_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from services.activelearning import selection
from services.activelearning.core import ActiveLearningCore, CandidateIn
from services.activelearning.embedder import ModelEmbedder
from services.activelearning.scores import COLUMN, UncertaintyMethod
from services.activelearning.settings import ActiveLearningSettings
from services.common.channels import open_channel
from services.common.localhost import free_port
from services.common.redis import connect
from tests.integration.activelearning.conftest import al_with_inference_server

pytestmark = pytest.mark.integration

# Two template copies (one number differs), a paraphrase, and other questions.
QUESTIONS = [
    ("Customer: Where is my order 4821?", "Agent: It ships tomorrow."),
    ("Customer: Where is my order 1937?", "Agent: It ships tomorrow."),
    ("Customer: Where is my parcel 4821?", "Agent: It left our warehouse today."),
    ("Customer: When does my paycheck arrive?", "Agent: Deposits post by Thursday."),
    ("Customer: My flight was cancelled, can I rebook?", "Agent: Yes, at no charge."),
    ("Customer: Would I be eligible for a home loan?", "Agent: Let me check your account."),
    ("Customer: Can I bring a second bag?", "Agent: One checked bag is included."),
    ("Customer: I received the wrong jeans.", "Agent: Sorry! I will send a return label."),
]


STRATEGIES = {
    "top_k": pb.SELECTION_STRATEGY_TOP_K,
    "diverse": pb.SELECTION_STRATEGY_DIVERSE,
    "hybrid": pb.SELECTION_STRATEGY_HYBRID,
}


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def candidates(entropies: list[float]) -> list[pb.Candidate]:
    return [
        pb.Candidate(
            id=f"c{i}",
            prompt=prompt,
            output=output,
            token_logprobs=[-0.3, -0.4],
            token_entropies=[h, h],
        )
        for i, ((prompt, output), h) in enumerate(zip(QUESTIONS, entropies, strict=True))
    ]


def counter(source: str) -> float:
    value = REGISTRY.get_sample_value(
        "loraplex_activelearning_embeddings_total", {"source": source}
    )
    return value or 0.0


@pytest.fixture(scope="module")
async def al_with_inference(redis_url, inference) -> AsyncIterator[tuple[object, object]]:
    async with al_with_inference_server(redis_url, inference, embed_with_model=True) as al:
        yield al


async def embed(stub: ipb_grpc.InferenceServiceStub, tenant: str, texts) -> np.ndarray:
    reply = await stub.Embed(ipb.EmbedRequest(tenant=tenant, texts=texts))
    return np.asarray([e.values for e in reply.embeddings], dtype=np.float32)


async def test_candidates_are_stored_with_the_base_model_embedding(al_with_inference, stub):
    al, core = al_with_inference
    tenant = new_tenant()
    before = counter("model")
    entropies = [0.5 + 0.1 * i for i in range(len(QUESTIONS))]
    reply = await al.SubmitCandidates(
        pb.SubmitCandidatesRequest(tenant=tenant, candidates=candidates(entropies))
    )
    assert reply.accepted == len(QUESTIONS) and not reply.rejected
    await core.embeddings_settled()
    assert counter("model") - before == len(QUESTIONS)

    pool = await core.queue.open_pool(tenant, 100)
    stored = dict(zip(pool.ids, pool.embeddings, strict=True))
    expected = await embed(stub, tenant, [p + "\n" + o for p, o in QUESTIONS])
    for i, vector in enumerate(expected):
        np.testing.assert_allclose(stored[f"c{i}"], vector, rtol=0, atol=1e-5)


async def test_selection_runs_on_the_model_embeddings(al_with_inference, stub):
    """Every strategy picks what it picks on the Embed RPC's vectors, which here differs from
    what it would pick on hashed n-grams: the template copy c1 (order 1937 for 4821) is a
    near-duplicate of c0 for the model (cosine 0.99) but not for the n-grams (0.88), and
    k-center greedy's second pick differs."""
    al, core = al_with_inference
    tenant = new_tenant()
    entropies = [2.0, 1.9, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    await al.SubmitCandidates(
        pb.SubmitCandidatesRequest(tenant=tenant, candidates=candidates(entropies))
    )
    await core.embeddings_settled()
    texts = [p + "\n" + o for p, o in QUESTIONS]
    model = await embed(stub, tenant, texts)
    ngram = np.stack([selection.text_embedding(t) for t in texts])
    pool = await core.queue.open_pool(tenant, 100)
    row = {item_id: i for i, item_id in enumerate(pool.ids)}
    order = np.asarray([row[f"c{i}"] for i in range(len(QUESTIONS))])
    scores = pool.rank_values[order, COLUMN[UncertaintyMethod.ENTROPY]]
    for strategy, value in STRATEGIES.items():
        reply = await al.SelectUncertain(
            pb.SelectUncertainRequest(
                tenant=tenant,
                method=pb.UNCERTAINTY_METHOD_ENTROPY,
                strategy=value,
                batch_size=4,
                dry_run=True,
            )
        )
        got = ([item.id for item in reply.items], reply.near_duplicates)

        def local(x: np.ndarray, strategy=strategy) -> tuple[list[str], int]:
            picked, skipped = selection.select(scores, x, 4, selection.Strategy(strategy))
            return [f"c{i}" for i in picked], skipped

        assert got == local(model), strategy
        assert got != local(ngram), strategy
        assert "c0" in got[0] and "c1" not in got[0]
    top, skipped = selection.select(scores, model, 4, selection.Strategy.TOP_K)
    assert top.tolist() == [0, 2, 3, 4] and skipped == 1


async def test_inference_down_falls_back_to_ngrams_and_backs_off(redis_url):
    redis = connect(redis_url)
    channel = open_channel(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        settings = ActiveLearningSettings(redis_url=redis_url, embed_retry_seconds=60)
        core = ActiveLearningCore(
            settings, redis, embedder=ModelEmbedder(channel, 256, retry_seconds=60)
        )
        tenant = new_tenant()
        before = counter("ngram_fallback")
        outputs = [
            CandidateIn(o, [-0.2], [0.5], prompt=p, id=f"c{i}")
            for i, (p, o) in enumerate(QUESTIONS[:3])
        ]
        core.start()
        started = time.monotonic()
        result = await core.submit(tenant, outputs)
        assert result.accepted == 3 and not result.rejected
        await core.embeddings_settled()
        assert counter("ngram_fallback") - before == 3
        pool = await core.queue.open_pool(tenant, 100)
        for item_id, vector in zip(pool.ids, pool.embeddings, strict=True):
            p, o = QUESTIONS[int(item_id[1:])]
            np.testing.assert_array_equal(vector, selection.text_embedding(p + "\n" + o))
        # Backing off: the next batch does not try inference again.
        rows, why = await core.embedder.embed(tenant, ["anything"])
        assert rows is None and why == "backoff"
        await core.submit(tenant, [CandidateIn("more", [-0.2], [0.5], prompt="q", id="c9")])
        await core.embeddings_settled()
        assert time.monotonic() - started < 5
        assert counter("ngram_fallback") - before == 4
    finally:
        await core.close()
        await channel.close()
        await redis.aclose()


async def test_model_vectors_of_another_size_fall_back_to_ngrams(redis_url, inference):
    inference_server, _ = inference
    redis = connect(redis_url)
    channel = open_channel(f"127.0.0.1:{inference_server.port}")
    try:
        settings = ActiveLearningSettings(redis_url=redis_url, embedding_dim=64)
        core = ActiveLearningCore(settings, redis, embedder=ModelEmbedder(channel, 64))
        rows, why = await core.embedder.embed(new_tenant(), ["Customer: hello"])
        assert rows is None and why == "bad_reply"
        core.embedder._skip_until = 0.0  # no backoff from the call above
        core.start()
        tenant = new_tenant()
        before = counter("ngram_fallback")
        await core.submit(tenant, [CandidateIn("out", [-0.2], [0.5], prompt="q", id="c0")])
        await core.embeddings_settled()
        assert counter("ngram_fallback") - before == 1
        pool = await core.queue.open_pool(tenant, 10)
        np.testing.assert_array_equal(pool.embeddings[0], selection.text_embedding("q\nout", 64))
    finally:
        await core.close()
        await channel.close()
        await redis.aclose()


async def test_caller_embeddings_are_kept_and_closed_items_are_not_revived(al_with_inference):
    al, core = al_with_inference
    tenant = new_tenant()
    own = np.zeros(256, dtype=np.float32)
    own[3] = 1.0
    batch = candidates([0.5] * len(QUESTIONS))[:2]
    batch[0].embedding.extend(own.tolist())
    await al.SubmitCandidates(pb.SubmitCandidatesRequest(tenant=tenant, candidates=batch))
    await core.embeddings_settled()
    pool = await core.queue.open_pool(tenant, 10)
    stored = dict(zip(pool.ids, pool.embeddings, strict=True))
    np.testing.assert_array_equal(stored["c0"], own)
    assert not np.array_equal(stored["c1"], selection.text_embedding("\n".join(QUESTIONS[1])))
    # An id no longer in the open pool is not written back.
    assert await core.queue.set_embeddings(tenant, ["gone"], np.ones((1, 256))) == 0
    assert await core.redis.hexists(core.queue.k(tenant, "feat"), "gone") == 0
