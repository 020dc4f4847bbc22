"""The inference domain layer: adapter registration, resolution, caching and generation.

No gRPC here: the servicer translates protos to these calls. The model runs on one thread,
driven by the continuous-batching scheduler; adapter parsing and file I/O run on the
default thread pool so they do not queue behind generations.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import TypeVar

import redis.asyncio as aioredis

from services.common.errors import InvalidArgument, Unavailable
from services.common.names import check_adapter_name, check_tenant, owner_of
from services.inference.cache import AdapterCache, CacheSnapshot, TieredAdapterCache
from services.inference.compose import compose, composition_key
from services.inference.decoding import DecodeSequence, Generation, SamplingConfig
from services.inference.engine import Engine, TokenScores, resolve_device
from services.inference.grammar import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarRequest,
    RowGrammar,
)
from services.inference.lora import LoraWeights, parse_adapter
from services.inference.registry import AdapterRecord, AdapterRegistry
from services.inference.scheduler import Scheduler, StreamChunk
from services.inference.settings import InferenceSettings
from services.inference.store import AdapterStore, collect_files
from services.inference.swap import HotSwap, SwapListener

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's chat bound; completions' is 5 (the gateway's to check)
SEED_SPACE = 2**64
# Embed: texts per request, and padded tokens (rows x longest) per forward pass; a request
# runs as several passes, between which decode steps go on.
MAX_EMBED_TEXTS = 256
EMBED_BATCH_TOKENS = 8192
CHAT_ROLES = {"system", "user", "assistant"}


def _first_set(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def _check_embed_count(count: int) -> None:
    if count > MAX_EMBED_TEXTS:
        raise InvalidArgument(
            f"{count} texts in one call, at most {MAX_EMBED_TEXTS} are allowed",
            reason="TOO_MANY_TEXTS",
            max_texts=str(MAX_EMBED_TEXTS),
        )


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling parameters as the caller sent them (None: not set)."""

    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Token log-probability detail with this many alternatives (None: none).
    top_logprobs: int | None = None
    prompt_logprobs: bool = False  # echo: the prompt tokens' log-probabilities too
    prompt_only: bool = False  # with prompt_logprobs: generate nothing
    n: int = 1  # choices per prompt
    best_of: int | None = None  # sequences per prompt, the n most likely kept (None: n)


# A prompt: text, or token ids.
Prompt = str | Sequence[int]


@dataclass(frozen=True)
class CompositionRequest:
    """Adapters to mix for one request: (name, version, weight) each, and the method."""

    parts: tuple[tuple[str, int, float], ...]
    method: str = "cat"
    density: float | None = None
    svd_rank: int | None = None
    majority_sign_method: str = "total"
    seed: int | None = None

    def params(self) -> dict:
        """compose()'s keyword arguments that the request set."""
        given = {
            "density": self.density,
            "svd_rank": self.svd_rank,
            "majority_sign_method": self.majority_sign_method,
            "seed": self.seed,
        }
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class ServedAdapter:
    """What serves a request: one registered adapter version, or a mix of several."""

    name: str
    version: int
    cache_key: Hashable
    load: Callable[[], Awaitable[LoraWeights]]
    composed_of: tuple[AdapterRecord, ...] = ()


@dataclass(frozen=True)
class Choice:
    """One returned sequence: OpenAI's choice `index` (prompt_index * n + rank)."""

    index: int
    prompt_index: int
    generation: Generation
    prompt_text: str = ""  # with prompt_logprobs: the prompt (token ids decoded)


@dataclass
class GenerateResult:
    choices: list[Choice]
    adapter: ServedAdapter | None
    queue_seconds: float
    # Prompt tokens once per prompt; every generated token, best_of's discarded ones too.
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def generation(self) -> Generation:
        """The first choice (the only one unless n, best_of or several prompts)."""
        return self.choices[0].generation


class InferenceCore:
    def __init__(self, settings: InferenceSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.registry = AdapterRegistry(redis)
        self.store = AdapterStore(settings.adapter_store_dir)
        self.cache = self._tiered_cache(settings)
        self.hot_swap = HotSwap(self.registry, self.store, self._prefetch)
        # Every replica hears of hot-swaps (on any replica) and warms the new version.
        self.swap_listener = SwapListener(redis, self.registry, prefetch=self._prefetch)
        self._engine: Engine | None = None
        self._scheduler: Scheduler | None = None
        self._grammars: GrammarCompiler | None = None

    @staticmethod
    def _tiered_cache(settings: InferenceSettings) -> TieredAdapterCache:
        """Host memory always; a device tier too when the model runs on a GPU."""
        ttl, share = settings.adapter_cache_ttl_seconds, settings.adapter_cache_tenant_share
        host = AdapterCache(
            settings.adapter_cache_bytes, tier="host", ttl_seconds=ttl, tenant_share=share
        )
        device = resolve_device(settings.device)
        if device.type == "cpu":
            return TieredAdapterCache(host)
        return TieredAdapterCache(
            host,
            AdapterCache(
                settings.device_cache_bytes, tier="device", ttl_seconds=ttl, tenant_share=share
            ),
            lambda weights: weights.to(device),
        )

    async def start(self) -> None:
        """Load the base model (seconds to minutes); until then requests get UNAVAILABLE."""
        s = self.settings
        self._engine = engine = await asyncio.to_thread(Engine, s.model_dir, s.device, s.dtype)
        self._grammars = await asyncio.to_thread(
            GrammarCompiler, engine.tokenizer, engine.logits_size, engine.eos_token_id
        )
        self._scheduler = Scheduler(self._engine, s.batching_limits())
        self._scheduler.start()
        self.swap_listener.start()

    def close(self) -> None:
        self.swap_listener.stop()
        if self._scheduler is not None:
            self._scheduler.stop()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise Unavailable("the base model is still loading", reason="MODEL_LOADING")
        return self._engine

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise Unavailable("the base model is still loading", reason="MODEL_LOADING")
        return self._scheduler

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            raise Unavailable("the base model is still loading", reason="MODEL_LOADING")
        return self._grammars

    def _row_grammar(self, compiled: CompiledGrammar | None) -> RowGrammar | None:
        """Each sequence its own matcher state (n choices each follow the grammar)."""
        return None if compiled is None else self.grammars.row(compiled)

    @property
    def max_new_tokens_limit(self) -> int:
        return min(self.settings.max_new_tokens_limit, self.engine.context_length - 1)

    # -- adapters ---------------------------------------------------------------------------

    async def register_adapter(
        self,
        tenant: str,
        name: str,
        version: int,
        files: dict[str, bytes],
        expected_sha256: str = "",
        shared: bool = False,
        candidate: bool = False,
    ) -> AdapterRecord:
        owner = owner_of(tenant, shared)
        check_adapter_name(name)
        adapter_files = collect_files(files, expected_sha256)
        engine = self.engine
        weights = await asyncio.to_thread(
            parse_adapter,
            adapter_files.config,
            adapter_files.weights,
            engine.linear_shapes,
            dtype=engine.dtype,
        )
        await asyncio.to_thread(self.store.save, owner, name, adapter_files)
        record = await self.registry.register(
            AdapterRecord(
                owner=owner,
                name=name,
                version=version,
                sha256=adapter_files.sha256,
                rank=weights.rank,
                lora_alpha=weights.lora_alpha,
                target_modules=weights.target_modules,
                size_bytes=weights.size_bytes,
            ),
            candidate=candidate,
        )
        log.info(
            "adapter registered",
            extra={"owner": owner, "adapter": name, "version": record.version},
        )
        return record

    async def _load_weights(self, record: AdapterRecord) -> LoraWeights:
        engine = self.engine

        def load() -> LoraWeights:
            files = self.store.load(record.owner, record.name, record.sha256)
            return parse_adapter(
                files.config,
                files.weights,
                engine.linear_shapes,
                dtype=engine.dtype,
                device="cpu",  # the host tier; the device tier copies from there
            )

        return await asyncio.to_thread(load)

    async def _prefetch(self, record: AdapterRecord) -> None:
        """Warm the version a swap made serve (SwapListener hook)."""
        await self.cache.ensure(record.cache_key, lambda: self._load_weights(record))

    async def resolve(self, tenant: str, name: str, version: int) -> AdapterRecord | None:
        """None for the base model (empty adapter name)."""
        if not name:
            check_tenant(tenant)
            return None
        return await self.registry.resolve(tenant, name, version)

    async def serve(
        self,
        tenant: str,
        name: str,
        version: int,
        composition: CompositionRequest | None = None,
    ) -> ServedAdapter | None:
        """What will serve a request: None for the base model."""
        if composition is None or not composition.parts:
            record = await self.resolve(tenant, name, version)
            if record is None:
                return None
            return ServedAdapter(
                record.name, record.version, record.cache_key, lambda: self._load_weights(record)
            )
        if name:
            raise InvalidArgument(
                "name either one adapter or a composition, not both", reason="BAD_INPUT"
            )
        check_tenant(tenant)
        limit = self.settings.max_composed_adapters
        method, params = composition.method, composition.params()
        weights = [w for _, _, w in composition.parts]
        # Weights, count, method and parameters are checked before any lookup.
        composition_key(
            [(n, w) for n, _, w in composition.parts], method, params, max_adapters=limit
        )
        records = [await self.registry.resolve(tenant, n, v) for n, v, _ in composition.parts]
        identities = [f"{r.owner}/{r.name}@{r.version}" for r in records]
        digest = composition_key(
            list(zip(identities, weights, strict=True)), method, params, max_adapters=limit
        )
        engine = self.engine

        async def load() -> LoraWeights:
            loaded = [await self._load_weights(r) for r in records]
            return await asyncio.to_thread(
                compose,
                loaded,
                weights,
                method,
                base_linears=engine.linear_shapes,
                max_adapters=limit,
                **params,
            )

        label = "composed:" + digest.removeprefix("composed:")[:16]
        return ServedAdapter(label, 0, (tenant, digest, 0), load, tuple(records))

    async def load_adapter(
        self, tenant: str, name: str, version: int, pin: bool | None = None
    ) -> tuple[AdapterRecord, bool, float]:
        """Prefetch an adapter into the cache; pin=True keeps it there, False lets it go."""
        record = await self.registry.resolve(tenant, name, version)
        started = time.perf_counter()
        was_cached = await self.cache.ensure(record.cache_key, lambda: self._load_weights(record))
        if pin is not None:
            self.cache.pin(record.cache_key, pin)
        return record, was_cached, time.perf_counter() - started

    async def unload_adapter(self, tenant: str, name: str, version: int) -> bool:
        record = await self.registry.resolve(tenant, name, version)
        return self.cache.remove(record.cache_key)

    def cache_stats(self) -> list[CacheSnapshot]:
        return self.cache.snapshot()

    # -- generation -------------------------------------------------------------------------

    def _sampling(self, params: SamplingRequest, prompt_tokens: int) -> SamplingConfig:
        limit = self.max_new_tokens_limit
        context = self.engine.context_length
        # A prompt only scored may fill the context; one to continue must leave room.
        if prompt_tokens > context or (prompt_tokens == context and not params.prompt_only):
            raise InvalidArgument(
                f"the prompt is {prompt_tokens} tokens, the model's context is {context}",
                reason="CONTEXT_LENGTH_EXCEEDED",
                prompt_tokens=prompt_tokens,
                context_length=context,
            )
        max_new_tokens = params.max_new_tokens or min(limit, context - prompt_tokens)
        if params.prompt_only:
            if not params.prompt_logprobs:
                raise InvalidArgument(
                    "prompt_only needs prompt_logprobs: there is nothing else to return",
                    reason="BAD_INPUT",
                )
            max_new_tokens = 0
        elif not 1 <= max_new_tokens <= limit:
            raise InvalidArgument(
                f"max_new_tokens must be between 1 and {limit}, got {max_new_tokens}",
                reason="BAD_MAX_TOKENS",
            )
        if prompt_tokens + max_new_tokens > context:
            raise InvalidArgument(
                f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens "
                f"were asked for, more than the model's context of {context} tokens",
                reason="CONTEXT_LENGTH_EXCEEDED",
                prompt_tokens=prompt_tokens,
                context_length=context,
            )
        engine = self.engine
        temperature = _first_set(
            params.temperature, self.settings.default_temperature, engine.default_temperature, 1.0
        )
        if not (math.isfinite(temperature) and 0 <= temperature <= 2):
            raise InvalidArgument(
                f"temperature must be in [0, 2], got {temperature}", reason="BAD_TEMPERATURE"
            )
        top_p = _first_set(params.top_p, self.settings.default_top_p, engine.default_top_p, 1.0)
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}", reason="BAD_TOP_P")
        if len(params.stop) > MAX_STOP_SEQUENCES or any(not s for s in params.stop):
            raise InvalidArgument(
                f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences are allowed",
                reason="BAD_STOP",
            )
        top_logprobs = params.top_logprobs
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}",
                reason="BAD_TOP_LOGPROBS",
            )
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=params.seed,
            stop=params.stop,
            top_logprobs=top_logprobs,
            prompt_logprobs=params.prompt_logprobs,
        )

    def _choice_counts(self, params: SamplingRequest, prompts: int, stream: bool) -> int:
        """Sequences to generate per prompt (best_of), after checking n and best_of: every
        row of a request must fit in one batch."""
        n, best_of = params.n, params.best_of if params.best_of is not None else params.n
        rows = self.settings.max_batch_size
        if n < 1:
            raise InvalidArgument(f"n must be at least 1, got {n}", reason="BAD_N")
        if best_of < n:
            raise InvalidArgument(
                f"best_of must be at least n ({n}), got {best_of}", reason="BAD_BEST_OF"
            )
        if stream and best_of > n:
            raise InvalidArgument(
                "best_of above n cannot be streamed: the best sequences are known only at the end",
                reason="BAD_BEST_OF",
            )
        if prompts * best_of > rows:
            name = "best_of" if best_of > n else "n"
            raise InvalidArgument(
                f"{name} is {best_of} for {prompts} prompt(s): {prompts * best_of} sequences, "
                f"more than the {rows} this server decodes together",
                reason="BAD_BEST_OF" if best_of > n else "BAD_N",
                max_sequences=str(rows),
            )
        return best_of

    def _prompt_text(
        self, prompt: str, messages: list[dict[str, str]], generation_prompt: bool = True
    ) -> str:
        if prompt and messages:
            raise InvalidArgument("give either a prompt or messages, not both", reason="BAD_INPUT")
        if messages:
            bad = sorted({m["role"] for m in messages} - CHAT_ROLES)
            if bad:
                raise InvalidArgument(
                    f"unknown message roles: {', '.join(bad)}", reason="BAD_MESSAGES"
                )
            return self.engine.render_chat(messages, generation_prompt)
        if not prompt:
            raise InvalidArgument("the prompt is empty", reason="EMPTY_PROMPT")
        return prompt

    def _prompts(
        self, prompt: Prompt, prompts: Sequence[Prompt], messages: list[dict[str, str]]
    ) -> list[Prompt]:
        """The request's prompts (texts or token ids), given exactly one way."""
        if isinstance(prompt, str) and not prompts:
            return [self._prompt_text(prompt, messages)]
        if (prompts and len(prompt)) or messages:
            raise InvalidArgument(
                "give one of a prompt, a list of prompts or messages", reason="BAD_INPUT"
            )
        chosen = list(prompts) or [prompt]
        if any(not len(p) for p in chosen):
            raise InvalidArgument("the prompt is empty", reason="EMPTY_PROMPT")
        return chosen

    async def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return await self._encode(prompt)
        self._check_token_ids(prompt)
        return list(prompt)

    async def generate(
        self,
        tenant: str,
        adapter_name: str,
        adapter_version: int,
        params: SamplingRequest,
        prompt: Prompt = "",
        messages: list[dict[str, str]] | None = None,
        composition: CompositionRequest | None = None,
        grammar: GrammarRequest | None = None,
        prompts: Sequence[Prompt] = (),
    ) -> GenerateResult:
        events = self.generate_stream(
            tenant,
            adapter_name,
            adapter_version,
            params,
            prompt=prompt,
            messages=messages,
            composition=composition,
            grammar=grammar,
            prompts=prompts,
            stream=False,
        )
        async for event in events:
            if isinstance(event, GenerateResult):
                return event
        raise AssertionError("a generation stream ends with its result")  # pragma: no cover

    async def generate_stream(
        self,
        tenant: str,
        adapter_name: str,
        adapter_version: int,
        params: SamplingRequest,
        prompt: Prompt = "",
        messages: list[dict[str, str]] | None = None,
        composition: CompositionRequest | None = None,
        grammar: GrammarRequest | None = None,
        stream: bool = True,
        prompts: Sequence[Prompt] = (),
    ) -> AsyncIterator[StreamChunk | GenerateResult]:
        """Chunks of new text as they are generated (each with its sequence's `index`),
        then the result. Everything a request can be refused for is checked before the
        first chunk. Several prompts, n and best_of run as rows of one batch: prompt p's
        sequence i samples with seed + i (so each prompt's choices are what a request for
        it alone returns); best_of keeps the n with the highest cumulative log-probability."""
        engine = self.engine
        texts = self._prompts(prompt, prompts, messages or [])
        best_of = self._choice_counts(params, len(texts), stream)
        prompt_ids = [await self._prompt_ids(p) for p in texts]
        configs = [self._sampling(params, len(ids)) for ids in prompt_ids]
        if messages:  # a chat reply is one assistant turn
            configs = [replace(c, stop=c.stop + engine.chat_stop) for c in configs]
        # What echo returns before the completion: the prompt (token ids decoded).
        echoed = [""] * len(texts)
        if params.prompt_logprobs:
            echoed = [
                p if isinstance(p, str) else engine.detokenize(ids)
                for p, ids in zip(texts, prompt_ids, strict=True)
            ]
        compiled = None
        if grammar is not None:
            compiled = await asyncio.to_thread(self.grammars.compile, grammar)
        served = await self.serve(tenant, adapter_name, adapter_version, composition)
        async with AsyncExitStack() as stack:
            weights = None
            if served is not None:  # pinned in the cache until the request ends
                weights = await stack.enter_async_context(
                    self.cache.use(served.cache_key, served.load)
                )
            sequences = [
                DecodeSequence(ids, weights, _seeded(config, i), self._row_grammar(compiled))
                for ids, config in zip(prompt_ids, configs, strict=True)
                for i in range(best_of)
            ]
            group = self.scheduler.submit_group(tenant, sequences, stream)
            finals: dict[int, StreamChunk] = {}
            try:
                async for chunk in group:
                    if chunk.generation is not None:
                        finals[chunk.index] = chunk
                    if chunk.prompt_logprobs:  # echo: the prompt's text comes first
                        chunk = replace(chunk, prompt_text=echoed[chunk.index // best_of])
                    if stream:
                        yield chunk
            finally:
                group.cancel()
        rows = [finals[i] for i in range(len(sequences))]
        yield _result(rows, echoed, prompt_ids, params, served)

    async def score(
        self,
        tenant: str,
        adapter_name: str,
        adapter_version: int,
        prompt: str,
        completions: list[str],
    ) -> tuple[list[TokenScores], AdapterRecord | None]:
        engine = self.engine
        if not prompt:
            raise InvalidArgument("the prompt is empty", reason="EMPTY_PROMPT")
        if not completions or any(not c for c in completions):
            raise InvalidArgument("give one or more non-empty completions", reason="BAD_INPUT")
        prompt_ids = await self._encode(prompt)
        completion_ids = [await self._encode(c, special_tokens=False) for c in completions]
        longest = len(prompt_ids) + max(len(c) for c in completion_ids)
        if longest > engine.context_length:
            raise InvalidArgument(
                f"prompt plus completion is {longest} tokens, more than the model's context of "
                f"{engine.context_length}",
                reason="CONTEXT_LENGTH_EXCEEDED",
            )
        record = await self.resolve(tenant, adapter_name, adapter_version)
        scores = await self._run(record, lambda w: engine.score(prompt_ids, completion_ids, w))
        return scores, record

    async def embed(
        self,
        tenant: str,
        adapter_name: str,
        adapter_version: int,
        texts: list[str],
        truncate: bool = False,
    ) -> tuple[list[list[float]], list[int], int, AdapterRecord | None]:
        """(one unit vector per text, tokens per text, dimension, the adapter that served):
        the masked mean of the last hidden state. Texts longer than the context are refused
        (CONTEXT_LENGTH_EXCEEDED) unless truncate, which keeps their first tokens."""
        if not texts or any(not t for t in texts):
            raise InvalidArgument("give one or more non-empty texts", reason="BAD_INPUT")
        _check_embed_count(len(texts))
        ids = [await self._encode(t, truncate=truncate) for t in texts]
        return await self._embed_ids(tenant, adapter_name, adapter_version, ids, truncate)

    async def embed_tokens(
        self,
        tenant: str,
        adapter_name: str,
        adapter_version: int,
        inputs: list[list[int]],
        truncate: bool = False,
    ) -> tuple[list[list[float]], list[int], int, AdapterRecord | None]:
        """embed() of token-id sequences, used as they are."""
        if not inputs or any(not seq for seq in inputs):
            raise InvalidArgument("give one or more non-empty token lists", reason="BAD_INPUT")
        _check_embed_count(len(inputs))
        for seq in inputs:
            self._check_token_ids(seq)
        return await self._embed_ids(tenant, adapter_name, adapter_version, inputs, truncate)

    async def _embed_ids(
        self,
        tenant: str,
        adapter_name: str,
        adapter_version: int,
        ids: list[list[int]],
        truncate: bool,
    ) -> tuple[list[list[float]], list[int], int, AdapterRecord | None]:
        engine = self.engine
        context = engine.context_length
        for index, seq in enumerate(ids):
            if len(seq) > context and not truncate:
                raise InvalidArgument(
                    f"text {index} is {len(seq)} tokens, more than the model's context of "
                    f"{context}",
                    reason="CONTEXT_LENGTH_EXCEEDED",
                    index=str(index),
                    context_length=str(context),
                )
        ids = [seq[:context] for seq in ids]
        record = await self.resolve(tenant, adapter_name, adapter_version)
        # Similar lengths together, each pass within EMBED_BATCH_TOKENS padded tokens.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        vectors: list[list[float]] = [[] for _ in ids]
        start = 0
        while start < len(order):
            end = start + 1
            # Sorted by length: the row joining is the longest, and sets the padding.
            while end < len(order) and len(ids[order[end]]) * (end - start + 1) <= (
                EMBED_BATCH_TOKENS
            ):
                end += 1
            chunk = order[start:end]
            batch = [ids[i] for i in chunk]
            result = await self._run(record, lambda w, batch=batch: engine.embed(batch, w))
            for i, row in zip(chunk, result.tolist(), strict=True):
                vectors[i] = row
            start = end
        dimension = len(vectors[0])
        return vectors, [len(seq) for seq in ids], dimension, record

    # -- tokenizer --------------------------------------------------------------------------

    async def tokenize(
        self,
        tenant: str,
        adapter_name: str,
        adapter_version: int,
        prompt: str = "",
        messages: list[dict[str, str]] | None = None,
        special_tokens: bool = True,
        generation_prompt: bool = True,
    ) -> list[int]:
        """The token ids generation would see for this prompt or these messages (with the
        defaults). The adapter is only checked: the tenant must be able to use it."""
        await self.resolve(tenant, adapter_name, adapter_version)
        text = self._prompt_text(prompt, messages or [], generation_prompt)
        return await self._encode(text, special_tokens=special_tokens)

    async def detokenize(
        self, tenant: str, adapter_name: str, adapter_version: int, tokens: list[int]
    ) -> str:
        await self.resolve(tenant, adapter_name, adapter_version)
        self._check_token_ids(tokens)
        return await asyncio.to_thread(self.engine.detokenize, tokens)

    def _check_token_ids(self, tokens: Sequence[int]) -> None:
        vocab = self.engine.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(
                f"token id {bad} is not in the vocabulary (0 to {vocab - 1})",
                reason="BAD_TOKEN_ID",
                vocab_size=str(vocab),
            )

    async def _encode(
        self, text: str, *, truncate: bool = False, special_tokens: bool = True
    ) -> list[int]:
        """Token ids, computed off the event loop. A text too long for the context by its
        length alone is refused (or cut, when `truncate`) before any tokenizing, so a huge
        one costs nothing."""
        engine = self.engine
        if len(text) > engine.max_text_chars:
            if not truncate:
                raise InvalidArgument(
                    f"the text is {len(text)} characters, more than the model's context of "
                    f"{engine.context_length} tokens can hold",
                    reason="CONTEXT_LENGTH_EXCEEDED",
                    context_length=str(engine.context_length),
                )
            text = text[: engine.max_text_chars]
        return await asyncio.to_thread(engine.encode, text, special_tokens)

    async def _run(self, record: AdapterRecord | None, work: Callable[[LoraWeights | None], T]):
        """Run work on the model thread, between decode steps, with the adapter pinned."""
        if record is None:
            return await asyncio.wrap_future(self.scheduler.call(lambda: work(None)))
        async with self.cache.use(record.cache_key, lambda: self._load_weights(record)) as weights:
            return await asyncio.wrap_future(self.scheduler.call(lambda: work(weights)))


def _seeded(config: SamplingConfig, i: int) -> SamplingConfig:
    """The i-th sequence of a prompt samples with seed + i (when a seed is set)."""
    if config.seed is None or i == 0:
        return config
    return replace(config, seed=(config.seed + i) % SEED_SPACE)


def _result(
    finals: list[StreamChunk],
    echoed: list[str],
    prompt_ids: list[list[int]],
    params: SamplingRequest,
    served: ServedAdapter | None,
) -> GenerateResult:
    """Every row's final chunk (prompt by prompt, best_of each) -> the choices: per prompt
    the n with the highest cumulative log-probability when best_of is above n (best first),
    else all in seed order. `echoed`: each prompt's text for echo ("" without)."""
    best_of = len(finals) // len(prompt_ids)
    n = params.n
    choices: list[Choice] = []
    for p, prompt_text in enumerate(echoed):
        rows = [chunk.generation for chunk in finals[p * best_of : (p + 1) * best_of]]
        if best_of > n:
            rows = sorted(rows, key=lambda g: g.cumulative_logprob, reverse=True)[:n]
        choices += [
            Choice(p * n + rank, p, generation, prompt_text) for rank, generation in enumerate(rows)
        ]
    return GenerateResult(
        choices,
        served,
        finals[0].queue_seconds,
        prompt_tokens=sum(len(ids) for ids in prompt_ids),
        completion_tokens=sum(chunk.generation.completion_tokens for chunk in finals),
    )
