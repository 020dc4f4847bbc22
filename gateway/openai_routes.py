"""OpenAI-compatible routes: the official clients work unchanged with base_url=.../v1.

Responses carry OpenAI's fields plus one `loraplex` object (adapter that served, timing,
uncertainty statistics), which OpenAI clients ignore.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter

from gateway.deps import Gateway, GatewayDep, TenantDep
from gateway.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_model,
)
from gateway.protojson import proto_to_json
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb

router = APIRouter(prefix="/v1", tags=["openai"])

_LIST_PAGE_SIZE = 1000  # the largest page ListAdapters serves


async def _generate(
    gateway: Gateway,
    tenant: str,
    body: GenerationRequest,
    max_tokens: int,
    request_id: str,
    *,
    prompt: str = "",
    messages: Sequence[pb.ChatMessage] = (),
) -> pb.GenerateResponse:
    info = await gateway.model_info()
    request = pb.GenerateRequest(
        tenant=tenant,
        adapter=parse_model(body.model, info.model_id),
        prompt=prompt,
        messages=messages,
        params=body.sampling_params(max_tokens),
        request_id=request_id,
    )
    return await gateway.inference.Generate(request, timeout=gateway.timeout)


def _finish_reason(reply: pb.GenerateResponse) -> str:
    return "length" if reply.finish_reason == pb.FINISH_REASON_LENGTH else "stop"


def _envelope(
    request_id: str, kind: str, body: GenerationRequest, reply: pb.GenerateResponse
) -> dict[str, Any]:
    """The fields a completion and a chat completion share, around their `choices`."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": body.model,
        "usage": proto_to_json(reply.usage),
        "loraplex": {
            "adapter": {"name": reply.adapter.name, "version": reply.adapter.version},
            "uncertainty": proto_to_json(reply.uncertainty),
            "timing": proto_to_json(reply.timing),
        },
    }


@router.post("/completions")
async def create_completion(
    body: CompletionRequest, tenant: TenantDep, gateway: GatewayDep
) -> dict[str, Any]:
    request_id = f"cmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_tokens if body.max_tokens is not None else body.DEFAULT_MAX_TOKENS
    reply = await _generate(gateway, tenant, body, max_tokens, request_id, prompt=body.prompt)
    choice = {
        "text": reply.text,
        "index": 0,
        "finish_reason": _finish_reason(reply),
        "logprobs": None,
    }
    return _envelope(request_id, "text_completion", body, reply) | {"choices": [choice]}


@router.post("/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, tenant: TenantDep, gateway: GatewayDep
) -> dict[str, Any]:
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    if max_tokens is None:  # OpenAI's chat default: 0 asks for as many tokens as fit
        max_tokens = 0
    messages = [m.to_proto() for m in body.messages]
    reply = await _generate(gateway, tenant, body, max_tokens, request_id, messages=messages)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": reply.text},
        "finish_reason": _finish_reason(reply),
        "logprobs": None,
    }
    return _envelope(request_id, "chat.completion", body, reply) | {"choices": [choice]}


async def _adapters(gateway: Gateway, tenant: str) -> AsyncIterator[common_pb2.AdapterInfo]:
    token = ""
    while True:
        page = await gateway.inference.ListAdapters(
            pb.ListAdaptersRequest(tenant=tenant, page_size=_LIST_PAGE_SIZE, page_token=token),
            timeout=gateway.timeout,
        )
        for adapter in page.adapters:
            yield adapter
        if not page.next_page_token or page.next_page_token == token:
            return
        token = page.next_page_token


@router.get("/models")
async def list_models(tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    info = await gateway.model_info()
    # The base model has no registration time; 0 is what the field allows for "unknown".
    data = [{"id": info.model_id, "object": "model", "created": 0, "owned_by": "platform"}]
    async for adapter in _adapters(gateway, tenant):
        data.append(
            {
                "id": adapter.name,
                "object": "model",
                "created": adapter.created_at.seconds,
                "owned_by": "platform" if adapter.shared else adapter.tenant,
            }
        )
    return {"object": "list", "data": data}
