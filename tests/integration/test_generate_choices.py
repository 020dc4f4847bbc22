"""Log-probabilities and several choices over the inference service's gRPC contract (the
gateway refuses most of these before they get here; other gRPC clients may not)."""

from __future__ import annotations

import grpc
import pytest

from loraplex.inference.v1 import inference_service_pb2 as pb
from tests.helpers import error_reason, new_tenant

pytestmark = pytest.mark.integration

PROMPT = "Customer: Where is my order 4821?\nAgent:"


def request(**fields) -> pb.GenerateRequest:
    params = {"max_new_tokens": 4, "temperature": 0.0} | fields.pop("params", {})
    fields.setdefault("prompt", PROMPT)
    return pb.GenerateRequest(tenant=new_tenant(), params=pb.SamplingParams(**params), **fields)


async def test_a_prompt_only_scored_may_fill_the_context(stub, inference):
    _, core = inference
    context = core.engine.context_length
    ids = pb.TokenIds(ids=[1] + [42] * (context - 1))
    reply = await stub.Generate(
        request(
            prompt="",
            prompt_token_ids=[ids],
            params={"prompt_logprobs": True, "prompt_only": True, "top_logprobs": 0},
        )
    )
    (choice,) = reply.choices
    assert len(choice.prompt_logprobs) == context and reply.usage.completion_tokens == 0
    assert not choice.prompt_logprobs[0].HasField("logprob")
    assert all(p.HasField("logprob") for p in choice.prompt_logprobs[1:])
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # continuing it would not fit
        await stub.Generate(request(prompt="", prompt_token_ids=[ids]))
    assert error_reason(refused.value) == "CONTEXT_LENGTH_EXCEEDED"


async def test_several_prompts_come_back_in_index_order_with_summed_usage(stub):
    reply = await stub.Generate(request(prompt="", prompts=[PROMPT, "Customer: hi\nAgent:"]))
    assert [(c.index, c.prompt_index) for c in reply.choices] == [(0, 0), (1, 1)]
    assert reply.text == reply.choices[0].text  # the top-level fields are the first choice
    assert reply.usage.prompt_tokens == sum(c.prompt_tokens for c in reply.choices)
    assert reply.usage.completion_tokens == sum(c.completion_tokens for c in reply.choices)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"params": {"n": 2, "best_of": 1}}, "BAD_BEST_OF"),
        ({"params": {"n": 33}}, "BAD_N"),
        ({"params": {"best_of": 40}}, "BAD_BEST_OF"),
        ({"params": {"top_logprobs": 21}}, "BAD_TOP_LOGPROBS"),
        ({"params": {"prompt_only": True}}, "BAD_INPUT"),
        ({"prompt": "", "prompt_token_ids": [pb.TokenIds(ids=[1, 99999])]}, "BAD_TOKEN_ID"),
        ({"prompt": "", "prompt_token_ids": [pb.TokenIds()]}, "EMPTY_PROMPT"),
        ({"prompts": ["a"], "prompt_token_ids": [pb.TokenIds(ids=[1])]}, "BAD_INPUT"),
        ({"prompts": ["a", "b"]}, "BAD_INPUT"),  # and `prompt` too
    ],
)
async def test_refusals(stub, fields, reason):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(request(**fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(refused.value) == reason


async def test_best_of_above_n_is_not_streamed(stub):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stub.GenerateStream(request(params={"best_of": 2})):
            pass
    assert error_reason(refused.value) == "BAD_BEST_OF"
