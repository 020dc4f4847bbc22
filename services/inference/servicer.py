"""gRPC servicer: translates protos to InferenceCore calls and back. No logic of its own."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgument
from services.common.keys import PLATFORM
from services.inference.cache import CacheSnapshot
from services.inference.core import (
    Choice,
    CompositionRequest,
    GenerateResult,
    InferenceCore,
    SamplingRequest,
    ServedAdapter,
)
from services.inference.decoding import Generation, TokenLogprob
from services.inference.grammar import GrammarRequest
from services.inference.registry import AdapterRecord, SwapResult
from services.inference.store import CONFIG_FILE, WEIGHTS_FILE
from services.inference.versions import AdapterVersions

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def adapter_info(record: AdapterRecord) -> common_pb2.AdapterInfo:
    created = Timestamp()
    created.FromNanoseconds(int(record.created_at * 1e9))
    return common_pb2.AdapterInfo(
        tenant="" if record.shared else record.owner,
        name=record.name,
        version=record.version,
        sha256=record.sha256,
        rank=record.rank,
        lora_alpha=record.lora_alpha,
        target_modules=record.target_modules,
        size_bytes=record.size_bytes,
        created_at=created,
        shared=record.shared,
    )


def adapter_ref(record: AdapterRecord | ServedAdapter | None) -> common_pb2.AdapterRef:
    if record is None:
        return common_pb2.AdapterRef()
    return common_pb2.AdapterRef(name=record.name, version=record.version)


def sampling_request(params: pb.SamplingParams) -> SamplingRequest:
    return SamplingRequest(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature if params.HasField("temperature") else None,
        top_p=params.top_p if params.HasField("top_p") else None,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        top_logprobs=params.top_logprobs if params.HasField("top_logprobs") else None,
        prompt_logprobs=params.prompt_logprobs,
        prompt_only=params.prompt_only,
        n=params.n or 1,
        best_of=params.best_of or None,
    )


def grammar_request(request: pb.GenerateRequest) -> GrammarRequest | None:
    if not request.HasField("structured_output"):
        return None
    return GrammarRequest(json_schema=request.structured_output.json_schema)


def composition_request(composition: pb.Composition) -> CompositionRequest | None:
    if not composition.parts:
        return None
    return CompositionRequest(
        parts=tuple((p.adapter.name, p.adapter.version, p.weight) for p in composition.parts),
        method=composition.method or "cat",
        density=composition.density if composition.HasField("density") else None,
        svd_rank=composition.svd_rank if composition.HasField("svd_rank") else None,
        majority_sign_method=composition.majority_sign_method or "total",
        seed=composition.seed if composition.HasField("seed") else None,
    )


def token_logprobs(
    details: list[TokenLogprob] | tuple[TokenLogprob, ...] | None, token_piece
) -> list[pb.TokenLogprob]:
    """Token ids -> their text and bytes (`token_piece`, the engine's) with their
    log-probabilities."""

    def entry(token_id: int, logprob: float | None, top=()) -> pb.TokenLogprob:
        text, raw = token_piece(token_id)
        alternatives = [entry(t, v) for t, v in top]
        return pb.TokenLogprob(
            token_id=token_id,
            token=text,
            token_bytes=raw,
            logprob=logprob,
            top_logprobs=alternatives,
        )

    return [entry(d.token_id, d.logprob, d.top) for d in details or ()]


def uncertainty(gen: Generation) -> pb.UncertaintyStats:
    return pb.UncertaintyStats(
        mean_token_entropy=gen.mean_token_entropy,
        mean_logprob=gen.mean_logprob,
        min_token_prob=gen.min_token_prob,
    )


def choice_proto(choice: Choice, token_piece) -> pb.Choice:
    gen = choice.generation
    return pb.Choice(
        index=choice.index,
        prompt_index=choice.prompt_index,
        text=gen.text,
        finish_reason=_FINISH[gen.finish_reason],
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens,
        token_logprobs=gen.token_logprobs,
        token_entropies=gen.token_entropies,
        uncertainty=uncertainty(gen),
        logprobs=token_logprobs(gen.logprobs, token_piece),
        prompt_logprobs=token_logprobs(gen.prompt_logprobs, token_piece),
        prompt_text=choice.prompt_text,
    )


def generate_response(result: GenerateResult, token_piece) -> pb.GenerateResponse:
    """The first choice in the top-level fields (as before several choices existed), every
    choice in `choices`, and usage summed over them."""
    gen, served, queued = result.generation, result.adapter, result.queue_seconds
    composed_of = served.composed_of if served is not None else ()
    return pb.GenerateResponse(
        composed_of=[adapter_ref(r) for r in composed_of],
        text=gen.text,
        finish_reason=_FINISH[gen.finish_reason],
        usage=common_pb2.TokenUsage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        timing=pb.Timing(
            queue_seconds=queued,
            time_to_first_token_seconds=queued + gen.time_to_first_token,
            total_seconds=queued + gen.total_seconds,
        ),
        uncertainty=uncertainty(gen),
        adapter=adapter_ref(served),
        token_logprobs=gen.token_logprobs,
        token_entropies=gen.token_entropies,
        token_texts=gen.token_texts,
        choices=[choice_proto(c, token_piece) for c in result.choices],
    )


def tier_stats(snap: CacheSnapshot) -> pb.CacheTierStats:
    return pb.CacheTierStats(
        tier=snap.tier,
        capacity_bytes=snap.capacity_bytes,
        used_bytes=snap.used_bytes,
        entries=snap.entries,
        hits=snap.hits,
        misses=snap.misses,
        evictions=snap.evictions,
        expirations=snap.expirations,
        pinned=snap.pinned,
        ttl_seconds=snap.ttl_seconds or 0.0,
        load_seconds_p50=snap.load_seconds_p50,
        load_seconds_p95=snap.load_seconds_p95,
        load_seconds_p99=snap.load_seconds_p99,
        adapters=[
            pb.CachedAdapter(
                tenant="" if owner == PLATFORM else owner,
                name=name,
                version=version,
                size_bytes=size,
                hits=hits,
            )
            for (owner, name, version), size, hits in snap.adapters
        ],
    )


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self.versions = AdapterVersions(core.registry, core.store)

    def _generation_args(self, request: pb.GenerateRequest) -> dict:
        if request.prompt_token_ids and request.prompts:
            raise InvalidArgument(
                "give prompts as texts or as token ids, not both", reason="BAD_INPUT"
            )
        prompts = list(request.prompts) or [list(p.ids) for p in request.prompt_token_ids]
        return {
            "tenant": request.tenant,
            "adapter_name": request.adapter.name,
            "adapter_version": request.adapter.version,
            "params": sampling_request(request.params),
            "prompt": request.prompt,
            "prompts": prompts,
            "messages": chat_messages(request.messages),
            "composition": composition_request(request.composition),
            "grammar": grammar_request(request),
        }

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        result = await self.core.generate(**self._generation_args(request))
        return generate_response(result, self.core.engine.token_piece)

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        token_piece = self.core.engine.token_piece
        async for event in self.core.generate_stream(**self._generation_args(request)):
            if isinstance(event, GenerateResult):
                yield pb.GenerateStreamResponse(final=generate_response(event, token_piece))
            elif event.text or event.logprobs or event.prompt_logprobs:
                yield pb.GenerateStreamResponse(
                    text=event.text,
                    index=event.index,
                    logprobs=token_logprobs(event.logprobs, token_piece),
                    prompt_logprobs=token_logprobs(event.prompt_logprobs, token_piece),
                    prompt_text=event.prompt_text,
                )

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        scores, record = await self.core.score(
            request.tenant,
            request.adapter.name,
            request.adapter.version,
            request.prompt,
            list(request.completions),
        )
        return pb.ScoreResponse(
            scores=[
                pb.CompletionScore(
                    total_logprob=s.total,
                    mean_logprob=s.total / len(s.token_logprobs),
                    num_tokens=len(s.token_logprobs),
                    token_logprobs=s.token_logprobs,
                )
                for s in scores
            ],
            adapter=adapter_ref(record),
        )

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        return embed_response(
            *await self.core.embed(
                request.tenant,
                request.adapter.name,
                request.adapter.version,
                list(request.texts),
                truncate=request.truncate,
            )
        )

    async def EmbedTokens(self, request: pb.EmbedTokensRequest, context) -> pb.EmbedResponse:
        return embed_response(
            *await self.core.embed_tokens(
                request.tenant,
                request.adapter.name,
                request.adapter.version,
                [list(i.ids) for i in request.inputs],
                truncate=request.truncate,
            )
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tokens = await self.core.tokenize(
            request.tenant,
            request.adapter.name,
            request.adapter.version,
            prompt=request.prompt,
            messages=chat_messages(request.messages),
            special_tokens=_flag(request, "add_special_tokens"),
            generation_prompt=_flag(request, "add_generation_prompt"),
        )
        engine = self.core.engine
        strings = engine.token_strings(tokens) if request.return_token_strs else []
        return pb.TokenizeResponse(
            tokens=tokens, token_strs=strings, max_model_len=engine.context_length
        )

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        text = await self.core.detokenize(
            request.tenant, request.adapter.name, request.adapter.version, list(request.tokens)
        )
        return pb.DetokenizeResponse(prompt=text)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context):
        records, next_token = await self.core.registry.list(
            request.tenant, request.page_size, request.page_token
        )
        return pb.ListAdaptersResponse(
            adapters=[adapter_info(r) for r in records], next_page_token=next_token
        )

    async def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context):
        record = await self.core.register_adapter(
            request.tenant,
            request.name,
            request.version,
            {f.name: f.content for f in request.files},
            expected_sha256=request.expected_sha256,
            shared=request.shared,
            candidate=request.candidate,
        )
        return pb.RegisterAdapterResponse(adapter=adapter_info(record))

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context):
        record, was_cached, seconds = await self.core.load_adapter(
            request.tenant,
            request.adapter.name,
            request.adapter.version,
            pin=request.pin if request.HasField("pin") else None,
        )
        return pb.LoadAdapterResponse(
            adapter=adapter_info(record), was_cached=was_cached, load_seconds=seconds
        )

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context):
        was_loaded = await self.core.unload_adapter(
            request.tenant, request.adapter.name, request.adapter.version
        )
        return pb.UnloadAdapterResponse(was_loaded=was_loaded)

    async def CacheStats(self, request: pb.CacheStatsRequest, context):
        tiers = [tier_stats(snap) for snap in self.core.cache_stats()]
        host = tiers[-1]
        return pb.CacheStatsResponse(
            tiers=tiers,
            capacity_bytes=host.capacity_bytes,
            used_bytes=host.used_bytes,
            entries=host.entries,
            hits=host.hits,
            misses=host.misses,
            evictions=host.evictions,
            load_seconds_total=self.core.cache.host.snapshot().load_seconds_total,
            load_seconds_p50=host.load_seconds_p50,
            load_seconds_p95=host.load_seconds_p95,
            adapters=host.adapters,
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        engine = self.core.engine
        return pb.GetModelInfoResponse(
            model_id=engine.model_id,
            architecture=engine.architecture,
            context_length=engine.context_length,
            max_new_tokens_limit=self.core.max_new_tokens_limit,
            device=str(engine.device),
            dtype=str(engine.dtype).removeprefix("torch."),
        )

    async def SwapAdapter(self, request: pb.SwapAdapterRequest, context):
        result = await self.core.hot_swap.swap(
            request.tenant,
            request.name,
            request.version,
            expected_sha256=request.expected_sha256,
            shared=request.shared,
        )
        return pb.SwapAdapterResponse(**swap_fields(result))

    async def RollbackAdapter(self, request: pb.RollbackAdapterRequest, context):
        result = await self.core.hot_swap.rollback(
            request.tenant, request.name, shared=request.shared
        )
        return pb.RollbackAdapterResponse(**swap_fields(result))

    async def GetAdapter(self, request: pb.GetAdapterRequest, context):
        found = await self.versions.get(
            request.tenant,
            request.adapter.name,
            request.adapter.version,
            include_files=request.include_files,
        )
        files = []
        if found.files is not None:
            files = [
                pb.AdapterFile(name=CONFIG_FILE, content=found.files.config),
                pb.AdapterFile(name=WEIGHTS_FILE, content=found.files.weights),
            ]
        return pb.GetAdapterResponse(
            adapter=adapter_info(found.record),
            serving=found.serving,
            candidate=found.candidate,
            files=files,
        )

    async def DiscardCandidate(self, request: pb.DiscardCandidateRequest, context):
        record = await self.versions.discard(request.tenant, request.name, request.version)
        return pb.DiscardCandidateResponse(adapter=adapter_info(record))


def chat_messages(messages: Iterable[pb.ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _flag(request: Message, field: str) -> bool:
    """An optional bool that defaults to true."""
    return getattr(request, field) if request.HasField(field) else True


def embed_response(
    vectors: list[list[float]], tokens: list[int], dimension: int, record: AdapterRecord | None
) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=[
            pb.Embedding(values=v, num_tokens=n) for v, n in zip(vectors, tokens, strict=True)
        ],
        dimension=dimension,
        adapter=adapter_ref(record),
    )


def swap_fields(result: SwapResult) -> dict:
    swapped_at = Timestamp()
    swapped_at.FromNanoseconds(int(result.swapped_at * 1e9))
    return {
        "previous": adapter_info(result.previous),
        "current": adapter_info(result.current),
        "swapped_at": swapped_at,
    }
