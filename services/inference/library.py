"""The library API: `from services import RealtimeCompositor, get_compositor`.

The inference service's domain layer in-process (no gRPC, no server): register adapters,
generate with one adapter or a weighted composition of several, stream, hot-swap and read
the cache statistics. Concurrent generate() calls share the continuous-batching scheduler,
exactly as requests to the service do.

    async with get_compositor() as compositor:  # the default model, an embedded Redis
        await compositor.register("acme", "support", "models/adapters/retailer")
        reply = await compositor.generate("acme", "Customer: Hi\\nAgent:", adapter="support")
        mixed = await compositor.generate(
            "acme", "Customer: Hi\\nAgent:", compose=[("support", 0.7), ("billing", 0.3)]
        )

The product spec's synchronous call is a thin facade over the same methods, usable from
plain code and from inside `async def` alike (it starts the model when nothing has yet):

    compositor = get_compositor(tenant="acme")  # the tenant of compose_sync
    model = compositor.compose_sync(["support", "billing"])  # equal weights, composed now
    reply = model.generate("Customer: Hi\\nAgent:", max_new_tokens=16)
    compositor.close_sync()
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from services.common.errors import InvalidArgument
from services.common.loops import LoopThread
from services.common.names import check_adapter_name
from services.common.redis import EmbeddedRedis, connect
from services.inference.cache import CacheSnapshot
from services.inference.core import (
    CompositionRequest,
    GenerateResult,
    InferenceCore,
    SamplingRequest,
)
from services.inference.registry import AdapterRecord, SwapResult
from services.inference.scheduler import StreamChunk
from services.inference.settings import InferenceSettings

__all__ = ["ComposedModel", "GenerateResult", "RealtimeCompositor", "get_compositor"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _ref(adapter: str) -> tuple[str, int]:
    """ "name" -> (name, 0: the serving version); "name@3" -> (name, 3)."""
    name, at, version = adapter.rpartition("@")
    return (name, int(version)) if at and version.isdigit() else (adapter, 0)


class RealtimeCompositor:
    """Multi-adapter generation in-process. The methods are coroutines, except the product
    spec's compose_sync (and close_sync, cache_stats). Call start() (or use `async with`)
    before generating: it loads the base model. Both kinds run in a loop of the object's
    own (see services.common.loops), so a Redis client passed in is used from there: give
    it one of its own."""

    def __init__(
        self,
        redis: aioredis.Redis | str | None = None,
        settings: InferenceSettings | None = None,
        *,
        tenant: str | None = None,
    ) -> None:
        """tenant: the tenant of compose_sync calls that name none."""
        self.settings = settings or InferenceSettings()
        self.tenant = tenant
        url = redis if isinstance(redis, str) else self.settings.redis_url
        self._embedded = EmbeddedRedis() if redis is None and url is None else None
        if isinstance(redis, aioredis.Redis):
            self.redis, self._owns_redis = redis, False
        else:
            self.redis = connect(url or self._embedded.url)
            self._owns_redis = True
        self.core = InferenceCore(self.settings, self.redis)
        self._loop = LoopThread("compositor-library")
        self._started: asyncio.Future | None = None

    async def start(self) -> RealtimeCompositor:
        await self._loop.run(self._start())
        return self

    async def _start(self) -> None:
        if self._started is None:  # once, however many callers ask
            self._started = asyncio.ensure_future(self.core.start())
        await self._started

    async def register(
        self, tenant: str, name: str, directory: str | Path, *, shared: bool = False
    ) -> AdapterRecord:
        """Register a PEFT adapter directory (safetensors only) as the next version of
        `name`; it serves new requests at once."""
        check_adapter_name(name)
        folder = Path(directory)
        files = {f: (folder / f).read_bytes() for f in ADAPTER_FILES if (folder / f).is_file()}
        owner = "" if shared else tenant
        return await self._loop.run(
            self.core.register_adapter(owner, name, 0, files, shared=shared)
        )

    async def generate(
        self,
        tenant: str,
        prompt: str = "",
        *,
        messages: list[dict[str, str]] | None = None,
        **options: Any,
    ) -> GenerateResult:
        """Generate from a prompt (or chat messages). Options:
        adapter: "name" or "name@version" ("" = the base model);
        compose: [(adapter, weight), ...] to mix several adapters, with method ("cat",
            "svd", "linear", "ties", "dare_linear", "dare_ties"), density, svd_rank,
            majority_sign_method and compose_seed as PEFT's add_weighted_adapter takes them;
        max_new_tokens (64), temperature, top_p, seed, stop."""
        request = self._request(tenant, **options)
        return await self._loop.run(self.core.generate(**request, prompt=prompt, messages=messages))

    async def stream(
        self,
        tenant: str,
        prompt: str = "",
        *,
        messages: list[dict[str, str]] | None = None,
        **options: Any,
    ) -> AsyncIterator[str]:
        """The same as generate(), yielding the text as it is decoded."""
        request = self._request(tenant, **options)
        chunks = self.core.generate_stream(**request, prompt=prompt, messages=messages)
        async for event in self._loop.iterate(chunks):
            if isinstance(event, StreamChunk) and event.text:
                yield event.text

    @staticmethod
    def _request(
        tenant: str,
        *,
        adapter: str = "",
        compose: Sequence[tuple[str, float]] = (),
        method: str = "cat",
        density: float | None = None,
        svd_rank: int | None = None,
        majority_sign_method: str = "total",
        compose_seed: int | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> dict[str, Any]:
        name, version = _ref(adapter)
        mix = None
        if compose:
            parts = tuple((*_ref(a), float(w)) for a, w in compose)
            mix = CompositionRequest(
                parts, method, density, svd_rank, majority_sign_method, compose_seed
            )
        return {
            "tenant": tenant,
            "adapter_name": name,
            "adapter_version": version,
            "params": SamplingRequest(max_new_tokens, temperature, top_p, seed, tuple(stop)),
            "composition": mix,
        }

    async def swap(
        self, tenant: str, name: str, version: int, expected_sha256: str = ""
    ) -> SwapResult:
        """Serve another registered version of `name` from now on (every replica on the same
        Redis hears of it); running generations finish on the version they started with."""
        return await self._loop.run(self.core.hot_swap.swap(tenant, name, version, expected_sha256))

    async def rollback(self, tenant: str, name: str) -> SwapResult:
        """Serve the version that served before the last swap again."""
        return await self._loop.run(self.core.hot_swap.rollback(tenant, name))

    def cache_stats(self) -> list[CacheSnapshot]:
        """Per tier (device first when the model runs on a GPU): entries, bytes, hits..."""
        return self.core.cache_stats()

    # --- the product spec's synchronous call -------------------------------------------

    def compose_sync(
        self,
        adapter_ids: Sequence[str],
        *,
        tenant: str | None = None,
        weights: Sequence[float] | None = None,
        **options: Any,
    ) -> ComposedModel:
        """The adapters ("name" or "name@version") mixed -- equal weights summing to 1
        unless given, generate()'s compose options (method, density, ...) -- and composed
        and cached now; one adapter is served as itself. Returns a model whose generate()
        runs the base model with the mix. Starts the base model if nothing has yet."""
        tenant = tenant or self.tenant
        if not tenant:
            raise InvalidArgument(
                "name the tenant: tenant=..., or get_compositor(..., tenant=...)",
                reason="INVALID_TENANT",
            )
        if not adapter_ids:
            raise InvalidArgument("name at least one adapter", reason="BAD_INPUT")
        if weights is not None and len(weights) != len(adapter_ids):
            raise InvalidArgument("one weight per adapter", reason="BAD_COMPOSITION_WEIGHTS")
        if len(adapter_ids) == 1:
            mix: dict[str, Any] = {"adapter": adapter_ids[0]}
        else:
            shares = weights or [1 / len(adapter_ids)] * len(adapter_ids)
            mix = {"compose": list(zip(adapter_ids, shares, strict=True)), **options}
        model = ComposedModel(self, tenant, mix)

        async def compose() -> ComposedModel:
            await self._start()
            request = self._request(tenant, **mix)
            served = await self.core.serve(
                tenant, request["adapter_name"], request["adapter_version"], request["composition"]
            )
            if served is not None:  # None: the base model alone
                await self.core.cache.ensure(served.cache_key, served.load)
            return model

        return self._loop.call(compose())

    def close_sync(self) -> None:
        """close() for plain code."""
        if not self._loop.stopped:
            self._loop.call(self._close())
            self._stop()

    # --- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        if not self._loop.stopped:
            await self._loop.run(self._close())
            self._stop()

    async def _close(self) -> None:
        self.core.close()
        if self._owns_redis:
            await self.redis.aclose()

    def _stop(self) -> None:
        self._loop.stop()
        if self._embedded is not None:
            self._embedded.close()

    async def __aenter__(self) -> RealtimeCompositor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> RealtimeCompositor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()


@dataclass(frozen=True)
class ComposedModel:
    """What compose_sync returns: the base model with a mix of adapters."""

    compositor: RealtimeCompositor
    tenant: str
    mix: dict[str, Any]  # generate()'s adapter or compose (+ method, ...) options

    def generate(
        self, prompt: str = "", *, messages: list[dict[str, str]] | None = None, **options: Any
    ) -> GenerateResult:
        """RealtimeCompositor.generate with the mix, waited for; options as there."""
        reply = self.compositor.generate(
            self.tenant, prompt, messages=messages, **self.mix, **options
        )
        return self.compositor._loop.call(reply)


def get_compositor(
    redis_url: str | None = None,
    settings: InferenceSettings | None = None,
    *,
    tenant: str | None = None,
) -> RealtimeCompositor:
    """A RealtimeCompositor on redis_url, else the settings' REDIS_URL (config/inference.yaml
    and config/composition.yaml, overridden by the environment), else an embedded Redis.
    tenant: the tenant of compose_sync calls that name none."""
    return RealtimeCompositor(redis_url, settings, tenant=tenant)
