"""Sampling-based selection end to end: a real active-learning server samples shortlisted
candidates from a real inference server (the real demo model), with the seeds, prompt form
and adapter the docs promise; what it stores is what direct Generate calls give."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from loraplex.activelearning.v1 import activelearning_service_pb2 as pb
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from services.activelearning.app import create_server
from services.activelearning.core import ActiveLearningCore, CandidateIn
from services.activelearning.dispersion import sample_scores
from services.activelearning.settings import ActiveLearningSettings
from services.common.channels import open_channel
from services.common.errors import FailedPrecondition, Unavailable
from services.common.localhost import free_port
from services.common.redis import connect
from tests.integration.activelearning.conftest import al_with_inference_server

pytestmark = pytest.mark.integration

SAMPLES, MAX_TOKENS = 3, 12


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
async def sampling_al(redis_url, inference) -> AsyncIterator[tuple[object, object]]:
    async with al_with_inference_server(
        redis_url,
        inference,
        sample_count=SAMPLES,
        sample_max_new_tokens=MAX_TOKENS,
        sample_temperature=1.0,
        shortlist_factor=2,
    ) as al:
        yield al


def cand(i: int, prompt: str, logprob: float, adapter: str = "") -> pb.Candidate:
    return pb.Candidate(
        id=f"c{i}",
        prompt=prompt,
        output=f"answer {i}",
        adapter=common_pb2.AdapterRef(name=adapter),
        token_logprobs=[logprob, logprob],
        token_entropies=[0.5, 0.5],
    )


async def direct_samples(stub, tenant: str, **prompt) -> list[str]:
    texts = []
    for seed in range(1, SAMPLES + 1):
        reply = await stub.Generate(
            ipb.GenerateRequest(
                tenant=tenant,
                params=ipb.SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=seed),
                **prompt,
            )
        )
        texts.append(reply.text)
    return texts


async def test_shortlist_is_sampled_once_and_ranked_by_disagreement(sampling_al, stub):
    al, core = sampling_al
    tenant = new_tenant()
    plain = "Customer: Where is my order?\nAgent:"
    chat = "user: My card was declined. What now?"
    # Margin (the shortlist method) ranks the lower log-probabilities first: c0, c1 are the
    # shortlist of a batch of 1 (factor 2); c2 (sure of itself) is never sampled.
    await al.SubmitCandidates(
        pb.SubmitCandidatesRequest(
            tenant=tenant,
            candidates=[
                cand(0, plain, -2.0),
                cand(1, chat, -1.5),
                cand(2, "Customer: Hi\nAgent:", -0.01),
            ],
        )
    )
    calls: list[int] = []
    sample = core.sampler.sample

    async def counted(t, requests):
        calls.append(len(requests))
        return await sample(t, requests)

    core.sampler.sample = counted
    request = pb.SelectUncertainRequest(
        tenant=tenant,
        method=pb.UNCERTAINTY_METHOD_SAMPLE_ROUGE_L,
        batch_size=1,
        dry_run=True,
    )
    first = await al.SelectUncertain(request)
    expected = {
        "c0": sample_scores(await direct_samples(stub, tenant, prompt=plain)),
        "c1": sample_scores(
            await direct_samples(
                stub,
                tenant,
                messages=[ipb.ChatMessage(role="user", content="My card was declined. What now?")],
            )
        ),
    }
    best = max(expected, key=lambda i: expected[i]["sample_rouge_l"])
    assert [i.id for i in first.items] == [best]
    assert first.method == pb.UNCERTAINTY_METHOD_SAMPLE_ROUGE_L and first.pool_size == 3
    assert first.items[0].scores.sample_rouge_l == pytest.approx(expected[best]["sample_rouge_l"])

    everything = await al.SelectUncertain(
        pb.SelectUncertainRequest(tenant=tenant, batch_size=10, dry_run=True)
    )
    by_id = {i.id: i.scores for i in everything.items}
    for item_id, scores in expected.items():
        for name, value in scores.items():
            assert getattr(by_id[item_id], name) == pytest.approx(value), (item_id, name)
    assert not by_id["c2"].HasField("sample_rouge_l")

    # Asked again (another sampling method too): the kept scores, no new generations.
    again = await al.SelectUncertain(request)
    eigv = await al.SelectUncertain(
        pb.SelectUncertainRequest(
            tenant=tenant, method=pb.UNCERTAINTY_METHOD_SAMPLE_EIGV, batch_size=1, dry_run=True
        )
    )
    assert [i.id for i in again.items] == [best]
    best_eigv = max(expected, key=lambda i: (expected[i]["sample_eigv"], i == "c0"))
    assert [i.id for i in eigv.items] == [best_eigv]
    assert calls == [2, 0, 0]


async def test_a_candidate_inference_refuses_is_left_out(sampling_al):
    al, _ = sampling_al
    tenant = new_tenant()
    await al.SubmitCandidates(
        pb.SubmitCandidatesRequest(
            tenant=tenant,
            candidates=[
                cand(0, "Customer: Hello\nAgent:", -2.0, adapter="never-registered"),
                cand(1, "Customer: Thanks!\nAgent:", -1.0),
            ],
        )
    )
    reply = await al.SelectUncertain(
        pb.SelectUncertainRequest(
            tenant=tenant, method=pb.UNCERTAINTY_METHOD_SAMPLE_JACCARD, batch_size=2
        )
    )
    assert [i.id for i in reply.items] == ["c1"] and reply.pool_size == 2
    # Queued by the sampling method: its score is the item's priority.
    assert reply.items[0].priority == reply.items[0].scores.sample_jaccard


async def test_without_or_with_a_dead_inference_service(redis_url):
    redis = connect(redis_url)
    tenant = new_tenant()
    candidate = CandidateIn("out", [-0.5], [0.5], prompt="Customer: Hi\nAgent:", id="c0")
    try:
        bare = ActiveLearningCore(ActiveLearningSettings(redis_url=redis_url), redis)
        await bare.submit(tenant, [candidate])
        with pytest.raises(FailedPrecondition) as err:
            await bare.select(tenant, "sample_eigv", None, 1, dry_run=True)
        assert err.value.reason == "SAMPLING_UNAVAILABLE"
        channel = open_channel(f"127.0.0.1:{free_port()}")  # nothing listens there
        settings = ActiveLearningSettings(redis_url=redis_url, sample_timeout_seconds=5)
        _, dead = create_server(settings, redis, inference_channel=channel)
        with pytest.raises(Unavailable) as err:
            await dead.select(tenant, "sample_eigv", None, 1, dry_run=True)
        assert err.value.reason == "INFERENCE_UNAVAILABLE"
        # Nothing was lost: the candidate is still open, and token methods still select it.
        assert [i.id for i in (await dead.select(tenant, "margin", None, 1)).items] == ["c0"]
        await channel.close()
    finally:
        await redis.aclose()
