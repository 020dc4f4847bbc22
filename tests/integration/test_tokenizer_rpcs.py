"""Tokenize, Detokenize and EmbedTokens over real gRPC with the real model and Redis; the
expected ids come from the model directory's tokenizer loaded here with transformers."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from transformers import AutoTokenizer

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.inference.settings import InferenceSettings
from tests.helpers import error_reason, new_tenant, register

pytestmark = pytest.mark.integration

TEXT = "Customer: Where is my order 4821?\nAgent:"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(InferenceSettings().model_dir)


def ref(name: str = "") -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(name=name)


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_tokenize_a_prompt_gives_the_tokenizers_ids(stub, tokenizer):
    reply = await stub.Tokenize(
        pb.TokenizeRequest(tenant=new_tenant(), prompt=TEXT, return_token_strs=True)
    )
    expected = tokenizer(TEXT).input_ids
    assert list(reply.tokens) == expected
    assert list(reply.token_strs) == tokenizer.convert_ids_to_tokens(expected)
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert reply.max_model_len == info.context_length
    bare = await stub.Tokenize(
        pb.TokenizeRequest(tenant=new_tenant(), prompt=TEXT, add_special_tokens=False)
    )
    assert list(bare.tokens) == tokenizer(TEXT, add_special_tokens=False).input_ids
    assert not bare.token_strs


async def test_tokenized_messages_count_what_a_chat_generation_uses(stub, tokenizer):
    tenant = new_tenant()
    messages = [pb.ChatMessage(role="user", content="How do I reset my PIN?")]
    tokens = (await stub.Tokenize(pb.TokenizeRequest(tenant=tenant, messages=messages))).tokens
    generated = await stub.Generate(
        pb.GenerateRequest(
            tenant=tenant,
            messages=messages,
            params=pb.SamplingParams(max_new_tokens=2, temperature=0),
        )
    )
    assert len(tokens) == generated.usage.prompt_tokens
    plain = [{"role": "user", "content": "How do I reset my PIN?"}]
    rendered = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=False)
    without = await stub.Tokenize(
        pb.TokenizeRequest(tenant=tenant, messages=messages, add_generation_prompt=False)
    )
    assert list(without.tokens) == tokenizer(rendered).input_ids


async def test_detokenize_inverts_tokenize(stub, tokenizer):
    ids = tokenizer(TEXT).input_ids
    reply = await stub.Detokenize(pb.DetokenizeRequest(tenant=new_tenant(), tokens=ids))
    assert reply.prompt == TEXT


async def test_token_ids_outside_the_vocabulary_are_refused(stub, tokenizer):
    tenant = new_tenant()
    for bad in (len(tokenizer), -1):
        err = await rpc_error(stub.Detokenize(pb.DetokenizeRequest(tenant=tenant, tokens=[bad])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(err) == "BAD_TOKEN_ID"
        err = await rpc_error(
            stub.EmbedTokens(
                pb.EmbedTokensRequest(tenant=tenant, inputs=[pb.TokenIds(ids=[1, bad])])
            )
        )
        assert error_reason(err) == "BAD_TOKEN_ID"


async def test_another_tenants_adapter_is_not_found_for_the_tokenizer(stub):
    owner, other = new_tenant(), new_tenant()
    await register(stub, owner, demo="bank")
    ok = await stub.Tokenize(pb.TokenizeRequest(tenant=owner, adapter=ref("support"), prompt="a"))
    assert ok.tokens
    calls = [
        stub.Tokenize(pb.TokenizeRequest(tenant=other, adapter=ref("support"), prompt="a")),
        stub.Detokenize(pb.DetokenizeRequest(tenant=other, adapter=ref("support"), tokens=[1])),
    ]
    for call in calls:
        assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND


async def test_embed_tokens_equals_embed_of_the_same_text(stub, tokenizer):
    tenant = new_tenant()
    await register(stub, tenant, demo="retailer")
    texts = [TEXT, "Customer: I want a refund."]
    ids = [pb.TokenIds(ids=tokenizer(t).input_ids) for t in texts]
    for adapter in ("", "support"):
        by_text = await stub.Embed(
            pb.EmbedRequest(tenant=tenant, adapter=ref(adapter), texts=texts)
        )
        by_ids = await stub.EmbedTokens(
            pb.EmbedTokensRequest(tenant=tenant, adapter=ref(adapter), inputs=ids)
        )
        assert by_ids.adapter == by_text.adapter
        assert [e.num_tokens for e in by_ids.embeddings] == [len(i.ids) for i in ids]
        np.testing.assert_array_equal(
            [list(e.values) for e in by_ids.embeddings],
            [list(e.values) for e in by_text.embeddings],
        )


async def test_embed_tokens_refuses_an_empty_sequence(stub):
    err = await rpc_error(
        stub.EmbedTokens(pb.EmbedTokensRequest(tenant=new_tenant(), inputs=[pb.TokenIds()]))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err) == "BAD_INPUT"
