"""Per-token entropies (and texts) travel with a queue item to the reviewer, who sees the
output's tokens shaded by their entropy."""

from __future__ import annotations

import uuid

import pytest

from loraplex.activelearning.v1 import activelearning_service_pb2 as pb
from loraplex.common.v1 import common_pb2

pytestmark = pytest.mark.integration

PIECES = ["Agent:", " Your", " parcel", " left", " today", "."]
ENTROPIES = [0.25, 1.5, 0.75, 2.0, 0.5, 0.125]  # exact in float32


def candidate(id: str, texts: list[str]) -> pb.Candidate:
    return pb.Candidate(
        id=id,
        prompt="Customer: Where is my parcel?",
        output="".join(PIECES),
        adapter=common_pb2.AdapterRef(name="support", version=1),
        token_logprobs=[-0.5] * len(PIECES),
        token_entropies=ENTROPIES,
        token_texts=texts,
    )


async def test_the_leased_item_carries_each_tokens_text_and_entropy(al_stub):
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    reply = await al_stub.SubmitCandidates(
        pb.SubmitCandidatesRequest(
            tenant=tenant,
            candidates=[candidate("with-texts", PIECES), candidate("short", PIECES[:-1])],
        )
    )
    assert list(reply.ids) == ["with-texts"]
    assert [(r.index, r.reason) for r in reply.rejected] == [(1, "LENGTH_MISMATCH")]
    leased = await al_stub.NextForFeedback(pb.NextForFeedbackRequest(tenant=tenant, reviewer="ana"))
    assert list(leased.item.token_texts) == PIECES
    assert list(leased.item.token_entropies) == ENTROPIES
    assert leased.item.scores.entropy == pytest.approx(sum(ENTROPIES) / len(ENTROPIES))


async def test_without_texts_the_entropies_still_come(al_stub):
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    await al_stub.SubmitCandidates(
        pb.SubmitCandidatesRequest(tenant=tenant, candidates=[candidate("no-texts", [])])
    )
    leased = await al_stub.NextForFeedback(pb.NextForFeedbackRequest(tenant=tenant, reviewer="ana"))
    assert list(leased.item.token_entropies) == ENTROPIES
    assert list(leased.item.token_texts) == []
