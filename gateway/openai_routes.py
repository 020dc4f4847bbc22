"""OpenAI-compatible routes: the official clients work unchanged with base_url=.../v1.

Responses carry OpenAI's fields plus one `loraplex` object (adapter that served, timing,
uncertainty statistics, experiment variant), which OpenAI clients ignore.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.adapter_metrics import EXPERIMENT_REQUESTS
from gateway.deps import CallerDep, Gateway, GatewayDep, TenantDep
from gateway.keys import Caller
from gateway.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_model,
)
from gateway.protojson import proto_to_json
from gateway.structured_outputs import plan as structured_plan
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.analytics_exporter import completion_event
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
    unit: str = ""  # the experiment's unit (`user`), for feedback outcomes
    composition: pb.Composition | None = None


async def _route(gateway: Gateway, tenant: str, body: GenerationRequest, base_id: str) -> Route:
    """`model` names an adapter, the base model, or `experiment:<key>`: then `user` is the
    unit assigned (deterministic and sticky) to a variant, here, by the experiments client
    library; a unit the experiment leaves out gets the control."""
    if body.composition is not None:
        if body.model != base_id:
            raise InvalidArgument(
                f"with a composition, `model` must be the base model {base_id!r}; the "
                "composition names the adapters",
                reason="COMPOSITION_NEEDS_BASE_MODEL",
            )
        return Route(common_pb2.AdapterRef(), composition=body.composition.to_proto(base_id))
    if not body.model.startswith(EXPERIMENT_PREFIX):
        return Route(parse_model(body.model, base_id))
    key = body.model.removeprefix(EXPERIMENT_PREFIX)
    if not body.user:
        raise InvalidArgument(
            "set `user` (a stable id of the end user) to target an experiment",
            reason="USER_REQUIRED",
        )
    assignment = await gateway.require_assigner().assign(tenant, key, body.user)
    variant = assignment.serving
    refs = [common_pb2.AdapterRef(name=a.name, version=a.version) for a in variant.adapters]
    adapter, composition = common_pb2.AdapterRef(), None
    if len(refs) == 1:
        adapter = refs[0]
    elif refs:  # a variant that mixes adapters is served as an exact (cat) composition
        parts = [
            pb.Composition.Part(adapter=ref, weight=a.weight or 1.0)
            for ref, a in zip(refs, variant.adapters, strict=True)
        ]
        composition = pb.Composition(parts=parts, method="cat")
    in_experiment = assignment.in_experiment
    return Route(adapter, key, variant.name, in_experiment, body.user, composition)


@dataclass
class _Call:
    """One generation request on its way to the inference service, and its bookkeeping."""

    gateway: Gateway
    caller: Caller
    request: pb.GenerateRequest
    route: Route
    base_id: str
    started: float

    @property
    def tenant(self) -> str:
        return self.caller.tenant

    async def record(self, served: common_pb2.AdapterRef, **outcome: Any) -> None:
        """Account for the request's outcome: Prometheus series, the tenant's token budget
        and the analytics event (in the outbox before the response is sent; never fails
        the request)."""
        gateway, tenant = self.gateway, self.tenant
        served = served if served.name else common_pb2.AdapterRef(name=self.base_id)
        seconds = time.perf_counter() - self.started
        code = outcome.get("code", grpc.StatusCode.OK).name
        usage = outcome["reply"].usage if "reply" in outcome else None
        gateway.adapter_series.observe(
            tenant,
            served.name,
            code,
            seconds,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            served="code" not in outcome,
        )
        if usage is not None:
            gateway.charge_tokens(self.caller, usage.total_tokens)
        if self.route.in_experiment:
            EXPERIMENT_REQUESTS.labels(self.route.experiment, self.route.variant).inc()
        # An active-learning candidate: one prompt (or conversation) given as text.
        request = self.request
        single = bool(request.prompt or request.messages)
        if gateway.candidates is not None and "reply" in outcome and single:
            gateway.candidates.completion(
                tenant, self.request, outcome["reply"], self.route, self.base_id
            )
        if gateway.exporter is None:
            return
        event = completion_event(tenant, served, seconds, **outcome)
        if self.route.in_experiment:  # units outside the experiment are not in its results
            event.experiment, event.variant = self.route.experiment, self.route.variant
        await gateway.exporter.add(event)

    async def record_error(self, err: grpc.aio.AioRpcError) -> None:
        # Unknown adapter names are not events: analytics would refuse them anyway.
        if err.code() != grpc.StatusCode.NOT_FOUND:
            await self.record(self.route.adapter, code=err.code())


async def _start(
    gateway: Gateway,
    caller: Caller,
    body: GenerationRequest,
    max_tokens: int,
    request_id: str,
    *,
    prompts: list[str] | list[list[int]] = (),
    messages: Sequence[pb.ChatMessage] = (),
) -> _Call:
    ceiling, tenant = caller.max_tokens_per_request, caller.tenant
    if ceiling and max_tokens > ceiling:
        raise InvalidArgument(
            f"max_tokens is {max_tokens}; this tenant may ask for at most {ceiling}",
            reason="MAX_TOKENS_OVER_LIMIT",
            limit=str(ceiling),
        )
    params = body.sampling_params(max_tokens or ceiling)  # 0: as many as fit, if allowed
    info = await gateway.model_info()
    route = await _route(gateway, tenant, body, info.model_id)
    request = pb.GenerateRequest(
        tenant=tenant,
        adapter=route.adapter,
        composition=route.composition,
        messages=messages,
        params=params,
        request_id=request_id,
    )
    if prompts and isinstance(prompts[0], str):
        if len(prompts) == 1:
            request.prompt = prompts[0]
        else:
            request.prompts.extend(prompts)
    elif prompts:
        request.prompt_token_ids.extend(pb.TokenIds(ids=ids) for ids in prompts)
    return _Call(gateway, caller, request, route, info.model_id, time.perf_counter())


async def _generate(call: _Call) -> pb.GenerateResponse:
    try:
        reply = await call.gateway.inference.Generate(call.request, timeout=call.gateway.timeout)
    except grpc.aio.AioRpcError as err:
        await call.record_error(err)
        raise
    await call.record(reply.adapter, reply=reply)
    return reply


async def _stream(
    call: _Call,
    delta: Callable[[pb.GenerateStreamResponse], dict[str, Any] | None],
    finish: Callable[[pb.GenerateResponse], list[dict[str, Any]]],
) -> StreamingResponse:
    """Server-sent events as OpenAI streams them. The first message is awaited here, so a
    request refused by the inference service still gets its HTTP status (400, 404, 429)."""
    stream = call.gateway.inference.GenerateStream(call.request, timeout=call.gateway.timeout)
    messages = stream.__aiter__()
    try:
        first = await anext(messages)
    except grpc.aio.AioRpcError as err:
        await call.record_error(err)
        raise

    async def events() -> AsyncIterator[str]:
        message = first
        try:
            while True:  # the last message may carry text too
                carries = message.text or message.logprobs or message.prompt_logprobs
                if carries and (chunk := delta(message)) is not None:
                    yield _sse(chunk)
                if message.HasField("final"):
                    break
                message = await anext(messages)
            await call.record(message.final.adapter, reply=message.final)
            for chunk in finish(message.final):
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        except grpc.aio.AioRpcError as err:  # mid-stream: the status line is already sent
            await call.record_error(err)
            yield _sse({"error": {"code": err.code().name, "message": err.details() or ""}})
        finally:
            stream.cancel()  # a no-op when finished; frees the model's row if the client left

    return StreamingResponse(events(), media_type="text/event-stream")


def _json(payload: dict[str, Any]) -> JSONResponse:
    # Already plain JSON types: skip FastAPI's generic (and per-request costly) encoder walk.
    return JSONResponse(payload)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _header(request_id: str, kind: str, body: GenerationRequest) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": body.model}


def _extras(reply: pb.GenerateResponse, route: Route) -> dict[str, Any]:
    """What loraplex adds to a response: adapter that served, uncertainty, timing, variant."""
    extras: dict[str, Any] = {
        "adapter": {"name": reply.adapter.name, "version": reply.adapter.version},
        "composed_of": [{"name": a.name, "version": a.version} for a in reply.composed_of],
        "uncertainty": proto_to_json(reply.uncertainty),
        "timing": proto_to_json(reply.timing),
    }
    if route.experiment:
        extras["experiment"] = {
            "key": route.experiment,
            "variant": route.variant,
            "in_experiment": route.in_experiment,
        }
    return extras


def _envelope(
    request_id: str, kind: str, body: GenerationRequest, reply: pb.GenerateResponse, route: Route
) -> dict[str, Any]:
    """The fields a completion and a chat completion share, around their `choices`."""
    return _header(request_id, kind, body) | {
        "usage": proto_to_json(reply.usage),
        "loraplex": _extras(reply, route),
    }


def _final_chunks(
    head: dict[str, Any],
    last: Callable[[pb.Choice], dict[str, Any]],
    reply: pb.GenerateResponse,
    call: _Call,
    body,
) -> list[dict[str, Any]]:
    """The last chunk of each choice (its finish reason; the last one carries the loraplex
    extras) and, when the client asked with stream_options.include_usage, OpenAI's usage
    chunk with no choices."""
    chunks = [head | {"choices": [last(c)]} for c in _choices(reply)]
    chunks[-1] = chunks[-1] | {"loraplex": _extras(reply, call.route)}
    if body.include_usage:
        chunks.append(head | {"choices": [], "usage": proto_to_json(reply.usage)})
    return chunks


def _choices(reply: pb.GenerateResponse) -> Sequence[pb.Choice]:
    """Every choice of a reply; one without `choices` (from an inference service older
    than this gateway) has its one choice in the top-level fields."""
    if reply.choices:
        return reply.choices
    return [pb.Choice(text=reply.text, finish_reason=reply.finish_reason)]


def _finish_reason(choice: pb.Choice) -> str:
    return "length" if choice.finish_reason == pb.FINISH_REASON_LENGTH else "stop"


def _logprob(entry: pb.TokenLogprob) -> float | None:
    return entry.logprob if entry.HasField("logprob") else None


def _completion_logprobs(entries: Sequence[pb.TokenLogprob], text_start: int = 0) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object. top_logprobs holds the asked-for most
    likely tokens and the chosen one (so up to logprobs + 1, as OpenAI's); text_offset is
    where each token's text starts in the choice's text, counted as vLLM counts it (the
    sum of the token texts before it)."""
    offsets, offset = [], text_start
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    tops = []
    for entry in entries:
        if not entry.HasField("logprob"):
            tops.append(None)
            continue
        top = {t.token: t.logprob for t in entry.top_logprobs}
        top.setdefault(entry.token, entry.logprob)
        tops.append(top)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_logprob(e) for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chat_logprobs(entries: Sequence[pb.TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: per token its text, bytes and alternatives."""

    def token(entry: pb.TokenLogprob) -> dict[str, Any]:
        return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token_bytes)}

    content = [token(e) | {"top_logprobs": [token(t) for t in e.top_logprobs]} for e in entries]
    return {"content": content, "refusal": None}


@router.post("/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, caller: CallerDep, gateway: GatewayDep
) -> JSONResponse | StreamingResponse:
    request_id = f"cmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_tokens if body.max_tokens is not None else body.DEFAULT_MAX_TOKENS
    call = await _start(gateway, caller, body, max_tokens, request_id, prompts=body.prompts)
    head = _header(request_id, "text_completion", body)
    wants_logprobs = body.logprobs is not None
    # Streaming: each choice's token texts' length so far, where its next offsets start.
    offsets: dict[int, int] = {}

    def delta(message: pb.GenerateStreamResponse) -> dict[str, Any]:
        # Echo: the choice's first chunk brings the prompt, and its tokens' scores, first.
        text = message.prompt_text + message.text
        logprobs = None
        if wants_logprobs:
            entries = [*message.prompt_logprobs, *message.logprobs]
            start = offsets.get(message.index, 0)
            logprobs = _completion_logprobs(entries, start)
            offsets[message.index] = start + sum(len(e.token) for e in entries)
        piece = {"text": text, "index": message.index, "finish_reason": None}
        return head | {"choices": [piece | {"logprobs": logprobs}]}

    def last(choice: pb.Choice) -> dict[str, Any]:
        reason = _finish_reason(choice)
        return {"text": "", "index": choice.index, "finish_reason": reason, "logprobs": None}

    if body.stream:
        return await _stream(
            call, delta, lambda reply: _final_chunks(head, last, reply, call, body)
        )
    reply = await _generate(call)

    def whole(choice: pb.Choice) -> dict[str, Any]:
        prompt = choice.prompt_text if body.echo else ""
        logprobs = None
        if wants_logprobs:
            entries = [*choice.prompt_logprobs, *choice.logprobs] if body.echo else choice.logprobs
            logprobs = _completion_logprobs(entries)
        return {
            "text": prompt + choice.text,
            "index": choice.index,
            "finish_reason": _finish_reason(choice),
            "logprobs": logprobs,
        }

    return _json(
        _envelope(request_id, "text_completion", body, reply, call.route)
        | {"choices": [whole(c) for c in _choices(reply)]}
    )


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, caller: CallerDep, gateway: GatewayDep
) -> JSONResponse | StreamingResponse:
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    if max_tokens is None:  # OpenAI's chat default: 0 asks for as many tokens as fit
        max_tokens = 0
    messages = [m.to_proto() for m in body.messages]
    structured = structured_plan(body)  # response_format, tools: gateway/structured_outputs.py
    call = await _start(gateway, caller, body, max_tokens, request_id, messages=messages)
    structured.constrain(call.request)
    if body.stream:
        head = _header(request_id, "chat.completion.chunk", body)
        opened: set[int] = set()

        def piece(index: int, content: dict[str, Any]) -> dict[str, Any]:
            # The first delta of each choice names the role, as OpenAI's do.
            if index not in opened:
                content = {"role": "assistant"} | content
                opened.add(index)
            return {"index": index, "delta": content, "finish_reason": None}

        def delta(message: pb.GenerateStreamResponse) -> dict[str, Any] | None:
            content = structured.delta(message.index, message.text)
            if content is None:  # tool calls listed whole at the end
                return None
            chunk = piece(message.index, content)
            if body.logprobs:
                chunk["logprobs"] = _chat_logprobs(message.logprobs)
            return head | {"choices": [chunk]}

        def last(choice: pb.Choice) -> dict[str, Any]:
            reason = structured.finish_reason(_finish_reason(choice))
            return {"index": choice.index, "delta": {}, "finish_reason": reason}

        def finish(reply: pb.GenerateResponse) -> list[dict[str, Any]]:
            calls = [
                head | {"choices": [piece(c.index, content)]}
                for c in _choices(reply)
                for content in structured.final_deltas(c.text)
            ]
            return calls + _final_chunks(head, last, reply, call, body)

        return await _stream(call, delta, finish)
    reply = await _generate(call)
    choices = [
        {
            "index": c.index,
            "message": structured.message(c.text),
            "finish_reason": structured.finish_reason(_finish_reason(c)),
            "logprobs": _chat_logprobs(c.logprobs) if body.logprobs else None,
        }
        for c in _choices(reply)
    ]
    return _json(
        _envelope(request_id, "chat.completion", body, reply, call.route) | {"choices": choices}
    )


async def list_visible_adapters(
    gateway: Gateway, tenant: str
) -> AsyncIterator[common_pb2.AdapterInfo]:
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
    async for adapter in list_visible_adapters(gateway, tenant):
        data.append(
            {
                "id": adapter.name,
                "object": "model",
                "created": adapter.created_at.seconds,
                "owned_by": "platform" if adapter.shared else adapter.tenant,
            }
        )
    return {"object": "list", "data": data}
