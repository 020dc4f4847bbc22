"""The Embed RPC over real gRPC with the real model, real adapters and real Redis."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.settings import REPO_ROOT
from services.inference import core as core_module
from services.inference.core import MAX_EMBED_TEXTS
from tests.helpers import error_reason, new_tenant, register

pytestmark = pytest.mark.integration

TEXTS = [
    "Customer: Where is my order 4821?\nAgent:",
    "Customer: I moved. How do I update my address?",
    "Customer: My flight was cancelled, can I rebook?",
]


def embed_request(tenant: str, texts: list[str], adapter: str = "", **kw) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        tenant=tenant, adapter=common_pb2.AdapterRef(name=adapter), texts=texts, **kw
    )


def vectors(reply: pb.EmbedResponse) -> np.ndarray:
    return np.asarray([list(e.values) for e in reply.embeddings], dtype=np.float64)


def customer_lines(tenant: str, count: int) -> list[str]:
    path = REPO_ROOT / "models" / "data" / tenant / "heldout.txt"
    lines = [line for line in path.read_text().splitlines() if line.startswith("Customer:")]
    return list(dict.fromkeys(lines))[:count]


async def expect_error(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


async def test_embed_returns_one_unit_vector_per_text(stub):
    tenant = new_tenant()
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    reply = await stub.Embed(embed_request(tenant, TEXTS))

    x = vectors(reply)
    assert x.shape == (len(TEXTS), reply.dimension) and reply.dimension > 0
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert all(e.num_tokens > 0 for e in reply.embeddings)
    assert not reply.adapter.name  # the base model
    assert reply.embeddings[0].num_tokens < info.context_length


async def test_identical_texts_give_identical_vectors(stub):
    tenant = new_tenant()
    reply = await stub.Embed(embed_request(tenant, [TEXTS[0], TEXTS[1], TEXTS[0]]))
    x = vectors(reply)
    # Two rows of one batch: equal up to float32 rounding of the row's place in the batch.
    np.testing.assert_allclose(x[0], x[2], rtol=0, atol=1e-6)
    assert not np.allclose(x[0], x[1], atol=1e-3)
    # The same request twice: bit for bit.
    again = vectors(await stub.Embed(embed_request(tenant, [TEXTS[0], TEXTS[1], TEXTS[0]])))
    np.testing.assert_array_equal(x, again)


async def test_batched_equals_one_by_one(stub):
    tenant = new_tenant()
    # Different lengths, so the batch pads most of them.
    texts = [*TEXTS, "Hi", TEXTS[1] * 6]
    batched = vectors(await stub.Embed(embed_request(tenant, texts)))
    single = np.vstack([vectors(await stub.Embed(embed_request(tenant, [t]))) for t in texts])
    assert np.max(np.abs(batched - single)) <= 1e-5


async def test_a_request_split_into_several_passes_equals_one_by_one(stub, monkeypatch):
    monkeypatch.setattr(core_module, "EMBED_BATCH_TOKENS", 40)  # a few rows per pass
    tenant = new_tenant()
    texts = [*TEXTS, "Hi", TEXTS[1] * 3, TEXTS[2] * 2]
    split = await stub.Embed(embed_request(tenant, texts))
    single = [await stub.Embed(embed_request(tenant, [t])) for t in texts]
    assert [e.num_tokens for e in split.embeddings] == [s.embeddings[0].num_tokens for s in single]
    assert np.max(np.abs(vectors(split) - np.vstack([vectors(s) for s in single]))) <= 1e-5


async def test_adapter_changes_the_vectors(stub):
    tenant = new_tenant()
    await register(stub, tenant, demo="bank")
    base = await stub.Embed(embed_request(tenant, TEXTS))
    tuned = await stub.Embed(embed_request(tenant, TEXTS, adapter="support"))
    assert tuned.adapter.name == "support" and tuned.adapter.version == 1
    xb, xt = vectors(base), vectors(tuned)
    np.testing.assert_allclose(np.linalg.norm(xt, axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(xb - xt)) > 1e-3


async def test_template_copies_are_closer_than_paraphrases_and_other_questions(stub):
    texts = [
        "Customer: Where is my order 4821?",
        "Customer: Where is my order 1937?",
        "Customer: Where is my parcel 4821?",
        "Customer: When does my paycheck arrive?",
    ]
    x = vectors(await stub.Embed(embed_request(new_tenant(), texts)))
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] > sim[0, 3]
    assert sim[0, 1] >= 0.95  # a near-duplicate at the service's 0.9 threshold


async def test_nearest_neighbour_is_mostly_from_the_same_domain(stub):
    """Customer questions of the three demo domains (held-out data), base model: the nearest
    other question is of the same domain far more often than chance (1/3). Measured: 0.59
    with 40 questions per domain. The mean similarity within a domain is not reliably above
    the mean across domains (mean-pooled vectors of this tiny model are anisotropic: two
    unrelated texts have cosine around 0.6), so that is not asserted."""
    tenant = new_tenant()
    domains = ("retailer", "bank", "airline")
    x, labels = [], []
    for label, domain in enumerate(domains):
        lines = customer_lines(domain, 40)
        x.append(vectors(await stub.Embed(embed_request(tenant, lines))))
        labels += [label] * len(lines)
    z, lab = np.vstack(x), np.asarray(labels)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    accuracy = float((lab[sim.argmax(axis=1)] == lab).mean())
    assert accuracy > 0.45, accuracy


async def test_too_many_texts_is_invalid(stub):
    texts = ["hello"] * (MAX_EMBED_TEXTS + 1)
    err = await expect_error(
        stub.Embed(embed_request(new_tenant(), texts)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_reason(err) == "TOO_MANY_TEXTS"


@pytest.mark.parametrize("texts", [[], ["ok", ""]])
async def test_empty_input_is_invalid(stub, texts):
    err = await expect_error(
        stub.Embed(embed_request(new_tenant(), texts)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_reason(err) == "BAD_INPUT"


async def test_text_over_the_context_is_invalid_unless_truncated(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    long_text = "order " * (info.context_length + 10)
    err = await expect_error(
        stub.Embed(embed_request(new_tenant(), ["short", long_text])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_reason(err) == "CONTEXT_LENGTH_EXCEEDED"

    reply = await stub.Embed(embed_request(new_tenant(), [long_text], truncate=True))
    assert reply.embeddings[0].num_tokens == info.context_length
    np.testing.assert_allclose(np.linalg.norm(vectors(reply)), 1.0, atol=1e-5)


async def test_unknown_adapter_is_not_found(stub):
    await expect_error(
        stub.Embed(embed_request(new_tenant(), TEXTS, adapter="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
