"""OpenAI-compatible routes: the official clients work unchanged with base_url=.../v1.

Responses carry OpenAI's fields plus one `loraplex` object (adapter that served, timing,
uncertainty statistics, experiment variant), which OpenAI clients ignore.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import APIRouter

from gateway.analytics_exporter import completion_event
from gateway.deps import Gateway, GatewayDep, TenantDep
from gateway.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_model,
)
from gateway.protojson import proto_to_json
from loraplex.common.v1 import common_pb2
from loraplex.experiments.v1 import experiments_service_pb2 as xpb
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument

router = APIRouter(prefix="/v1", tags=["openai"])

_LIST_PAGE_SIZE = 1000  # the largest page ListAdapters serves


EXPERIMENT_PREFIX = "experiment:"


@dataclass(frozen=True)
class Route:
    """Which adapter serves a request, and the experiment variant that chose it, if any."""

    adapter: common_pb2.AdapterRef
    experiment: str = ""
    variant: str = ""
    in_experiment: bool = False


async def _route(gateway: Gateway, tenant: str, body: GenerationRequest, base_id: str) -> Route:
    """`model` names an adapter, the base model, or `experiment:<key>`: then `user` is the
    unit the experiments service assigns (deterministic and sticky) to a variant."""
    if not body.model.startswith(EXPERIMENT_PREFIX):
        return Route(parse_model(body.model, base_id))
    key = body.model.removeprefix(EXPERIMENT_PREFIX)
    if not body.user:
        raise InvalidArgument(
            "set `user` (a stable id of the end user) to target an experiment",
            reason="USER_REQUIRED",
        )
    assignment = await gateway.require_experiments().Assign(
        xpb.AssignRequest(tenant=tenant, experiment_key=key, unit_id=body.user),
        timeout=gateway.timeout,
    )
    variant = assignment.variant
    if not assignment.in_experiment:  # excluded units get the control, as GrowthBook does
        found = await gateway.require_experiments().GetExperiment(
            xpb.GetExperimentRequest(tenant=tenant, key=key), timeout=gateway.timeout
        )
        variant = found.experiment.variants[0]
    adapters = variant.adapters
    if len(adapters) > 1:
        raise InvalidArgument(
            f"variant {variant.name!r} composes {len(adapters)} adapters; "
            "composition is not supported yet",
            reason="COMPOSITION_UNSUPPORTED",
        )
    adapter = (
        common_pb2.AdapterRef(name=adapters[0].name, version=adapters[0].version)
        if adapters
        else common_pb2.AdapterRef()
    )
    return Route(adapter, key, variant.name, assignment.in_experiment)


async def _generate(
    gateway: Gateway,
    tenant: str,
    body: GenerationRequest,
    max_tokens: int,
    request_id: str,
    *,
    prompt: str = "",
    messages: Sequence[pb.ChatMessage] = (),
) -> tuple[pb.GenerateResponse, Route]:
    info = await gateway.model_info()
    route = await _route(gateway, tenant, body, info.model_id)
    request = pb.GenerateRequest(
        tenant=tenant,
        adapter=route.adapter,
        prompt=prompt,
        messages=messages,
        params=body.sampling_params(max_tokens),
        request_id=request_id,
    )
    started = time.perf_counter()

    def record(served: common_pb2.AdapterRef, **outcome: Any) -> None:
        served = served if served.name else common_pb2.AdapterRef(name=info.model_id)
        seconds = time.perf_counter() - started
        code = outcome.get("code", grpc.StatusCode.OK).name
        gateway.adapter_series.observe(tenant, served.name, code, seconds)
        if gateway.exporter is None:
            return
        event = completion_event(tenant, served, seconds, **outcome)
        if route.in_experiment:  # units outside the experiment are not part of its results
            event.experiment, event.variant = route.experiment, route.variant
        gateway.exporter.record(event)

    try:
        reply = await gateway.inference.Generate(request, timeout=gateway.timeout)
    except grpc.aio.AioRpcError as err:
        # Unknown adapter names are not recorded: any string would become a series.
        if err.code() != grpc.StatusCode.NOT_FOUND:
            record(route.adapter, code=err.code())
        raise
    record(reply.adapter, reply=reply)
    return reply, route


def _finish_reason(reply: pb.GenerateResponse) -> str:
    return "length" if reply.finish_reason == pb.FINISH_REASON_LENGTH else "stop"


def _envelope(
    request_id: str, kind: str, body: GenerationRequest, reply: pb.GenerateResponse, route: Route
) -> dict[str, Any]:
    """The fields a completion and a chat completion share, around their `choices`."""
    extras: dict[str, Any] = {
        "adapter": {"name": reply.adapter.name, "version": reply.adapter.version},
        "uncertainty": proto_to_json(reply.uncertainty),
        "timing": proto_to_json(reply.timing),
    }
    if route.experiment:
        extras["experiment"] = {
            "key": route.experiment,
            "variant": route.variant,
            "in_experiment": route.in_experiment,
        }
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": body.model,
        "usage": proto_to_json(reply.usage),
        "loraplex": extras,
    }


@router.post("/completions")
async def create_completion(
    body: CompletionRequest, tenant: TenantDep, gateway: GatewayDep
) -> dict[str, Any]:
    request_id = f"cmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_tokens if body.max_tokens is not None else body.DEFAULT_MAX_TOKENS
    reply, route = await _generate(
        gateway, tenant, body, max_tokens, request_id, prompt=body.prompt
    )
    choice = {
        "text": reply.text,
        "index": 0,
        "finish_reason": _finish_reason(reply),
        "logprobs": None,
    }
    return _envelope(request_id, "text_completion", body, reply, route) | {"choices": [choice]}


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
    reply, route = await _generate(gateway, tenant, body, max_tokens, request_id, messages=messages)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": reply.text},
        "finish_reason": _finish_reason(reply),
        "logprobs": None,
    }
    return _envelope(request_id, "chat.completion", body, reply, route) | {"choices": [choice]}


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
