"""The active-learning service over real gRPC on a real Redis: candidates, selection, the
feedback queue with leases, feedback kinds, export, agreement, tenant isolation, and
feedback forwarded to the real analytics and experiments services."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.activelearning.v1 import activelearning_service_pb2 as pb
from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.common.v1 import common_pb2
from services.activelearning.core import ActiveLearningCore, CandidateIn, Feedback
from services.activelearning.settings import ActiveLearningSettings
from services.common.errors import FailedPrecondition
from services.experiments.library import ABTestingFramework
from tests.helpers import error_reason

pytestmark = pytest.mark.integration


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def cand(i: int, entropy: float, *, prompt: str = "", adapter: str = "support", **kw):
    kw.setdefault("token_logprobs", [-0.3, -0.4, -0.2])
    kw.setdefault("token_entropies", [entropy] * 3)
    return pb.Candidate(
        id=kw.pop("id", f"c{i}"),
        prompt=prompt or f"Customer: question {i} about order {i * 37}?",
        output=kw.pop("output", f"Agent: answer {i}, reference {i * 91}."),
        adapter=common_pb2.AdapterRef(name=adapter, version=1),
        **kw,
    )


async def submit(stub, tenant, candidates) -> pb.SubmitCandidatesResponse:
    return await stub.SubmitCandidates(
        pb.SubmitCandidatesRequest(tenant=tenant, candidates=candidates)
    )


async def lease(stub, tenant, reviewer="alice") -> pb.NextForFeedbackResponse:
    return await stub.NextForFeedback(pb.NextForFeedbackRequest(tenant=tenant, reviewer=reviewer))


async def answer(stub, tenant, reply, reviewer="alice", **kind) -> pb.SubmitFeedbackResponse:
    return await stub.SubmitFeedback(
        pb.SubmitFeedbackRequest(
            tenant=tenant,
            item_id=reply.item.id,
            reviewer=reviewer,
            lease_id=reply.lease_id,
            **kind,
        )
    )


async def rpc_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), error_reason(err.value)


async def test_health_is_serving(al_servers):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{al_servers.activelearning.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(
                service="loraplex.activelearning.v1.ActiveLearningService"
            )
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_candidates_are_reported_and_the_good_ones_stored(al_stub):
    tenant = new_tenant()
    batch = [
        cand(0, 0.5),
        cand(1, 0.5, output=""),
        cand(2, 0.5, token_entropies=[0.1, 0.2]),
        cand(3, 0.5, token_logprobs=[-0.1, float("nan"), -0.2]),
        cand(4, 0.7),
        cand(5, 0.5, id="bad id with spaces"),
        cand(6, 0.5, embedding=[0.1, 0.2]),
        cand(7, 0.5, token_logprobs=[], token_entropies=[]),
        cand(8, 0.5, id="c0"),
    ]
    reply = await submit(al_stub, tenant, batch)
    assert reply.accepted == 2
    assert list(reply.ids) == ["c0", "c4"]
    assert [(r.index, r.reason) for r in reply.rejected] == [
        (1, "EMPTY_OUTPUT"),
        (2, "LENGTH_MISMATCH"),
        (3, "NOT_FINITE"),
        (5, "INVALID_ID"),
        (6, "EMBEDDING_SIZE"),
        (7, "EMPTY_OUTPUT"),
        (8, "DUPLICATE_IN_BATCH"),
    ]
    assert all(r.message for r in reply.rejected)
    again = await submit(al_stub, tenant, [cand(0, 0.9)])
    assert (again.accepted, again.duplicates) == (0, 1)
    stats = await al_stub.QueueStats(pb.QueueStatsRequest(tenant=tenant))
    assert (stats.open, stats.queued) == (2, 2)


async def test_queue_hands_out_the_most_uncertain_first(al_stub):
    tenant = new_tenant()
    entropies = [0.4, 2.2, 1.0, 0.1, 1.7, 0.9]
    await submit(al_stub, tenant, [cand(i, e) for i, e in enumerate(entropies)])
    seen = []
    for _ in entropies:
        reply = await lease(al_stub, tenant)
        seen.append(reply.item.scores.entropy)
        assert reply.item.priority == pytest.approx(reply.item.scores.entropy)
        assert reply.lease_id
    assert seen == pytest.approx(sorted(entropies, reverse=True))
    assert not (await lease(al_stub, tenant)).HasField("item")


async def test_leases_are_exclusive_and_expire(al_servers):
    core = al_servers.core
    tenant, t = new_tenant(), time.time()
    await core.submit(tenant, [CandidateIn("out", [-0.2], [0.5], prompt="p", id="x")], now=t)
    first, _ = await core.next_item(tenant, "alice", now=t)
    assert first is not None and first.item.id == "x"
    assert (await core.next_item(tenant, "bob", now=t + 1))[0] is None  # leased to alice
    again, _ = await core.next_item(tenant, "bob", now=t + 61)  # alice's lease expired
    assert again is not None and again.item.id == "x"
    with pytest.raises(FailedPrecondition) as err:
        await core.submit_feedback(
            tenant, "x", "alice", first.token, Feedback("rating", rating=4), now=t + 62
        )
    assert err.value.reason == "LEASE_NOT_HELD"
    with pytest.raises(FailedPrecondition) as err:
        await core.submit_feedback(
            tenant, "x", "bob", again.token, Feedback("rating", rating=4), now=t + 122
        )
    assert err.value.reason == "LEASE_EXPIRED"


async def test_feedback_errors(al_stub):
    tenant = new_tenant()
    await submit(al_stub, tenant, [cand(0, 1.0), cand(1, 0.5)])
    reply = await lease(al_stub, tenant)
    for rating in (0, 6, -1):
        assert await rpc_error(answer(al_stub, tenant, reply, rating=rating)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "RATING_OUT_OF_RANGE",
        )
    assert await rpc_error(answer(al_stub, tenant, reply)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_FEEDBACK",
    )
    assert await rpc_error(answer(al_stub, tenant, reply, reviewer="bob", rating=3)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_NOT_HELD",
    )
    # c1 is queued but not leased to anyone.
    stolen = pb.NextForFeedbackResponse(item=pb.QueueItem(id="c1"), lease_id=reply.lease_id)
    assert await rpc_error(answer(al_stub, tenant, stolen, rating=3)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_NOT_HELD",
    )
    done = await answer(al_stub, tenant, reply, rating=4)
    assert (done.reviews, done.closed) == (1, True) and done.feedback_id
    assert await rpc_error(answer(al_stub, tenant, reply, rating=4)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ITEM_CLOSED",
    )
    missing = pb.NextForFeedbackResponse(item=pb.QueueItem(id="nope"), lease_id="x")
    assert await rpc_error(answer(al_stub, tenant, missing, rating=4)) == (
        grpc.StatusCode.NOT_FOUND,
        "ITEM_NOT_FOUND",
    )


async def test_items_need_the_configured_number_of_reviews_from_different_reviewers(al_servers):
    core = ActiveLearningCore(
        ActiveLearningSettings(reviews_per_item=2, lease_seconds=60), al_servers.core.redis
    )
    tenant = new_tenant()
    outputs = [CandidateIn(f"out {i}", [-0.2], [0.5 + i], prompt=f"p{i}") for i in range(3)]
    await core.submit(tenant, outputs)
    votes = {"alice": [5, 2, 4], "bob": [4, 1, 4]}
    for reviewer, ratings in votes.items():
        for _ in range(3):
            lease_, _alt = await core.next_item(tenant, reviewer)
            assert lease_ is not None
            rating = ratings[int(lease_.item.get("prompt")[1])]
            got = await core.submit_feedback(
                tenant, lease_.item.id, reviewer, lease_.token, Feedback("rating", rating=rating)
            )
            assert got.closed is (reviewer == "bob")
        assert (await core.next_item(tenant, reviewer))[0] is None  # seen them all
    stats = await core.stats(tenant)
    assert stats["closed"] == 3 and stats["rating_items"] == 3
    # Interval alpha of units (5,4), (2,1), (4,4): D_o = 4/6; D_e = 2 * 6 * SS / (6 * 5) with
    # SS = 34/3 the squared deviations of the six values: 1 - (2/3) / (68/15) = 0.8529.
    assert stats["rating_alpha"] == pytest.approx(1 - (2 / 3) / (68 / 15))


async def test_pairwise_preference_between_two_outputs_of_one_prompt(al_stub):
    tenant = new_tenant()
    prompt = "Customer: can I change my flight?"
    await submit(
        al_stub,
        tenant,
        [
            cand(0, 2.0, prompt=prompt, output="Yes, in the app.", variant="control"),
            cand(1, 0.3, prompt=prompt, output="No.", variant="treatment", adapter="v2"),
            cand(2, 0.2, prompt="Customer: something else"),
        ],
    )
    reply = await lease(al_stub, tenant)
    assert reply.item.id == "c0" and reply.alternative.id == "c1"
    wrong_prompt = pb.PairwisePreference(other_item_id="c2", preferred_item_id="c2")
    assert await rpc_error(answer(al_stub, tenant, reply, pairwise=wrong_prompt)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAIRWISE_PROMPT_MISMATCH",
    )
    neither = pb.PairwisePreference(other_item_id="c1", preferred_item_id="c2")
    assert await rpc_error(answer(al_stub, tenant, reply, pairwise=neither)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAIRWISE",
    )
    ok = pb.PairwisePreference(other_item_id="c1", preferred_item_id="c0")
    assert (await answer(al_stub, tenant, reply, pairwise=ok)).closed
    export = await al_stub.ExportDataset(
        pb.ExportDatasetRequest(tenant=tenant, format=pb.DATASET_FORMAT_DPO)
    )
    assert [json.loads(x) for x in export.jsonl.decode().splitlines()] == [
        {"prompt": prompt, "chosen": "Yes, in the app.", "rejected": "No."}
    ]


async def test_tenants_never_see_each_others_items(al_stub):
    a, b = new_tenant(), new_tenant()
    await submit(al_stub, a, [cand(0, 1.0)])
    a_lease = await lease(al_stub, a)
    assert not (await lease(al_stub, b)).HasField("item")
    assert await rpc_error(answer(al_stub, b, a_lease, rating=1)) == (
        grpc.StatusCode.NOT_FOUND,
        "ITEM_NOT_FOUND",
    )
    b_select = await al_stub.SelectUncertain(pb.SelectUncertainRequest(tenant=b, batch_size=1))
    assert (list(b_select.items), b_select.pool_size) == ([], 0)
    await answer(al_stub, a, a_lease, rating=5)
    b_export = await al_stub.ExportDataset(
        pb.ExportDatasetRequest(tenant=b, format=pb.DATASET_FORMAT_SFT)
    )
    assert b_export.rows == 0 and b_export.jsonl == b""
    b_stats = await al_stub.QueueStats(pb.QueueStatsRequest(tenant=b))
    assert (b_stats.open, b_stats.queued, b_stats.closed, dict(b_stats.feedback)) == (0, 0, 0, {})


async def test_select_uncertain(al_stub):
    tenant = new_tenant()
    near_copies = [
        cand(
            i,
            2.0 + 0.01 * i,
            prompt="Customer: where is my order?",
            output=f"Checking ({i}).",
            token_logprobs=[-0.05] * 3,
        )
        for i in range(4)
    ]
    distinct = [cand(10 + i, 1.0 - 0.1 * i, token_logprobs=[-0.1 * (i + 1)] * 3) for i in range(4)]
    await submit(al_stub, tenant, near_copies + distinct)
    select = al_stub.SelectUncertain
    for size in (0, -2):
        code, got = await rpc_error(
            select(pb.SelectUncertainRequest(tenant=tenant, batch_size=size))
        )
        assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BATCH_SIZE")
    code, got = await rpc_error(
        select(pb.SelectUncertainRequest(tenant=tenant, batch_size=1, method=99))
    )
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_METHOD")

    top = await select(pb.SelectUncertainRequest(tenant=tenant, batch_size=3, dry_run=True))
    assert [i.id for i in top.items] == ["c3", "c10", "c11"]  # near-copies of c3 left out
    assert (top.pool_size, top.near_duplicates) == (8, 3)
    # More than the pool: every distinct candidate, ranked (as a LIMIT would), nothing queued.
    whole = await select(pb.SelectUncertainRequest(tenant=tenant, batch_size=50, dry_run=True))
    assert [i.id for i in whole.items] == ["c3", "c10", "c11", "c12", "c13"]
    assert (whole.pool_size, whole.near_duplicates) == (8, 3)
    diverse = await select(
        pb.SelectUncertainRequest(
            tenant=tenant, batch_size=3, strategy=pb.SELECTION_STRATEGY_HYBRID, dry_run=True
        )
    )
    assert sum(i.prompt == "Customer: where is my order?" for i in diverse.items) == 1
    other = await select(pb.SelectUncertainRequest(tenant=tenant, batch_size=1, adapter="other"))
    assert (list(other.items), other.pool_size) == ([], 0)

    # Selected by NLL (c13 has the lowest log-probs), they go to the front of the queue.
    by_nll = await select(
        pb.SelectUncertainRequest(tenant=tenant, batch_size=2, method=pb.UNCERTAINTY_METHOD_NLL)
    )
    assert by_nll.method == pb.UNCERTAINTY_METHOD_NLL
    assert [i.id for i in by_nll.items] == ["c13", "c12"]
    assert by_nll.items[0].priority == pytest.approx(0.4)
    assert [(await lease(al_stub, tenant)).item.id for _ in range(2)] == ["c13", "c12"]
    assert (await lease(al_stub, tenant)).item.id == "c3"  # then the queue by entropy


async def test_export_formats_with_adapter_and_time_filters(al_stub):
    tenant = new_tenant()
    await submit(
        al_stub,
        tenant,
        [cand(0, 3.0, adapter="a1"), cand(1, 2.0, adapter="a2"), cand(2, 1.0, adapter="a1")],
    )
    kinds = [
        {"rating": 5},
        {"thumbs": pb.THUMBS_DOWN},
        {"corrected_text": "Agent: the right answer."},
    ]
    before = time.time()
    for kind in kinds:
        await answer(al_stub, tenant, await lease(al_stub, tenant), **kind)

    async def export(fmt, **kw):
        reply = await al_stub.ExportDataset(
            pb.ExportDatasetRequest(tenant=tenant, format=fmt, **kw)
        )
        return [json.loads(line) for line in reply.jsonl.decode().splitlines()]

    sft = await export(pb.DATASET_FORMAT_SFT)
    assert sft == [
        {"prompt": cand(0, 0).prompt, "completion": cand(0, 0).output},
        {"prompt": cand(2, 0).prompt, "completion": "Agent: the right answer."},
    ]
    kto = await export(pb.DATASET_FORMAT_KTO, adapter="a2")
    assert kto == [{"prompt": cand(1, 0).prompt, "completion": cand(1, 0).output, "label": False}]
    dpo = await export(pb.DATASET_FORMAT_DPO)
    assert dpo == [
        {
            "prompt": cand(2, 0).prompt,
            "chosen": "Agent: the right answer.",
            "rejected": cand(2, 0).output,
        }
    ]
    from google.protobuf.timestamp_pb2 import Timestamp

    later = Timestamp()
    later.FromSeconds(int(time.time()) + 5)
    assert await export(pb.DATASET_FORMAT_SFT, start_time=later) == []
    earlier = Timestamp()
    earlier.FromSeconds(int(before) - 5)
    assert len(await export(pb.DATASET_FORMAT_SFT, start_time=earlier, end_time=later)) == 2
    code, reason = await rpc_error(
        al_stub.ExportDataset(pb.ExportDatasetRequest(tenant=tenant, format=0))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FORMAT")
    stats = await al_stub.QueueStats(pb.QueueStatsRequest(tenant=tenant))
    assert dict(stats.feedback) == {"rating": 1, "thumbs": 1, "corrected_text": 1}
    assert not stats.HasField("rating_alpha")  # no item has two ratings


async def eventually(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


async def test_ratings_reach_analytics_and_experiments(al_servers, al_stub, analytics_stub):
    tenant = new_tenant()
    ab = ABTestingFramework(al_servers.core.redis)
    await ab.create_experiment(
        tenant,
        "tone",
        [{"name": "control", "traffic_weight": 0.5}, {"name": "warm", "traffic_weight": 0.5}],
        primary_metric={"name": "rating", "kind": "mean"},
        start=True,
    )
    variant = (await ab.assign(tenant, "tone", "user-1")).variant.name
    await submit(
        al_stub,
        tenant,
        [cand(0, 1.0, experiment="tone", variant=variant, unit_id="user-1", adapter="support")],
    )
    await answer(al_stub, tenant, await lease(al_stub, tenant), rating=4)

    async def analytics_rating():
        reply = await analytics_stub.GetAdapterMetrics(
            apb.GetAdapterMetricsRequest(tenant=tenant, adapter="support")
        )
        return reply.metrics if reply.metrics.rating_count else None

    metrics = await eventually(analytics_rating)
    assert metrics is not None and (metrics.rating_count, metrics.rating_mean) == (1, 4.0)

    async def experiment_rating():
        results = await ab.get_results(tenant, "tone")
        rating = next(m for m in results.metrics if m.metric.name == "rating")
        return [(a.n, a.sum) for a in rating.aggregates if a.n] or None

    assert await eventually(experiment_rating) == [(1, 4.0)]
