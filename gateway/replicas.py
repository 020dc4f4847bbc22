"""The inference replicas behind the gateway, and which one serves each request.

InferenceReplicas stands where a single InferenceServiceStub would (`gateway.inference`),
so routes do not change: Generate and GenerateStream go to the replica chosen by adapter
affinity, the cache statistics are gathered from every replica, pinning reaches every
replica, and any other RPC (registry reads and writes, swaps: shared state in Redis, which
pub/sub announces to every replica) goes to the least-loaded live one.

Affinity is rendezvous (highest-random-weight) hashing with bounded load (Mirrokni et al.,
"Consistent Hashing with Bounded Loads", 2018): the replicas are ranked by a hash of (key,
address) and the first whose in-flight requests are under ceil((1 + ε) · (total + 1) / n)
serves (a replica with fewer than `load_floor` in flight always may: it batches them).
An adapter's requests land where it is cached; a hot adapter spills to its second-ranked
replica instead of queueing; a replica that leaves moves only its own keys.

A call that fails with UNAVAILABLE before anything was received is retried once on another
replica. A replica that fails that way (transport, or shutting down: no domain reason) is
left out for replica_down_seconds, or until its health check says SERVING again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import logging
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status.rpc_status import GRPC_DETAILS_METADATA_KEY

from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.errors import Unavailable

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DNS_SCHEME = "dns:///"
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_METHODS = pb.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name
# Not retried on another replica: a second attempt could apply them twice.
_NOT_IDEMPOTENT = frozenset({"RegisterAdapter", "RollbackAdapter"})


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSource:
    """A fixed list of host:port addresses, or one DNS name whose every address is a
    replica (dns_name and dns_port)."""

    addresses: tuple[str, ...] = ()
    dns_name: str = ""
    dns_port: int = 0


def parse_address(text: str) -> tuple[str, int]:
    """host:port ([v6]:port for IPv6) -> (host, port), or ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
        return host, int(port)
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host.lower(), int(port)


def parse_replicas(value: str) -> ReplicaSource:
    """INFERENCE_ADDRESSES: "host:port,host:port,..." or "dns:///name:port". Duplicates and
    bad addresses are refused (ValueError), so a typo stops the gateway at start-up instead
    of halving its capacity."""
    value = value.strip()
    if value.startswith(DNS_SCHEME):
        host, port = parse_address(value.removeprefix(DNS_SCHEME))
        return ReplicaSource(dns_name=host, dns_port=port)
    entries = [entry.strip() for entry in value.split(",")]
    if not any(entries):
        raise ValueError("the inference replica list is empty")
    seen: dict[tuple[str, int], str] = {}
    for entry in entries:
        if not entry:
            raise ValueError(f"empty entry in the inference replica list {value!r}")
        parsed = parse_address(entry)
        if parsed in seen:
            raise ValueError(f"inference replica {entry!r} is listed twice")
        seen[parsed] = entry
    return ReplicaSource(addresses=tuple(f"{host}:{port}" for host, port in seen))


# -- the choice ---------------------------------------------------------------------------


def rendezvous_rank(key: str, addresses: Iterable[str]) -> list[str]:
    """The replicas in the key's order of preference: highest hash of (key, address) first.
    Stable across processes (blake2b, not Python's salted hash()) and list orders."""

    def weight(address: str) -> int:
        digest = hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    return sorted(addresses, key=lambda a: (-weight(a), a))


def bounded_choice(
    ranked: Sequence[str], in_flight: Mapping[str, int], epsilon: float, floor: int = 0
) -> str:
    """The first replica in `ranked` whose in-flight count is under the bound
    max(ceil((1 + ε) · (total + 1) / n), floor); the bound's sum exceeds the total, so one
    always is. Under `floor` a replica is never passed over: it batches those together."""
    total = sum(in_flight.get(a, 0) for a in ranked) + 1  # + the request being placed
    bound = max(math.ceil((1 + epsilon) * total / len(ranked)), floor)
    for address in ranked:
        if in_flight.get(address, 0) < bound:
            return address
    return ranked[0]


def routing_key(request: pb.GenerateRequest) -> str:
    """What affinity follows: the adapter (tenant-qualified: names are per tenant), or a
    composition's sorted parts, so the same mix lands where its parts are cached. Empty
    for the base model, which every replica has."""
    if request.adapter.name:
        refs = [request.adapter]
    else:
        refs = [part.adapter for part in request.composition.parts]
    names = sorted(f"{ref.name}@{ref.version}" for ref in refs)
    return f"{request.tenant}/{'+'.join(names)}" if names else ""


def is_transport_failure(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE without a domain error (ErrorInfo trailer): the replica is unreachable
    or shutting down, not e.g. short of Redis."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return not any(name == GRPC_DETAILS_METADATA_KEY for name, _ in err.trailing_metadata() or ())


# -- the replicas -------------------------------------------------------------------------


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    owned: bool  # opened here (closed here), or handed in by the caller
    in_flight: int = 0
    down_until: float = 0.0
    stub: pb_grpc.InferenceServiceStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def call_ended(self) -> None:
        self.in_flight -= 1

    def up(self, now: float) -> bool:
        return now >= self.down_until


def no_replica() -> Unavailable:
    return Unavailable(
        "no inference replica is reachable; retry later",
        reason="NO_REPLICA",
        retry_after_seconds="1",
    )


class InferenceReplicas:
    """The gateway's view of the inference replicas (see the module docstring). start()
    opens what it needs and starts the health prober (and DNS refresh); close() ends both
    and closes the channels it opened."""

    def __init__(
        self,
        source: ReplicaSource,
        *,
        open_channel: Callable[[str], grpc.aio.Channel],
        routing: str = "affinity",
        load_factor: float = 0.25,
        load_floor: int = 0,
        down_seconds: float = 5.0,
        probe_seconds: float = 1.0,
        dns_refresh_seconds: float = 10.0,
        health_timeout: float = 2.0,
    ) -> None:
        self.source = source
        self._open_channel = open_channel
        self.routing = routing
        self.load_factor = load_factor
        self.load_floor = load_floor
        self.down_seconds = down_seconds
        self.probe_seconds = probe_seconds
        self.dns_refresh_seconds = dns_refresh_seconds
        self.health_timeout = health_timeout
        self._replicas: dict[str, Replica] = {}
        self._round_robin = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task] = set()

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, open_channel: Callable[[str], grpc.aio.Channel]
    ) -> InferenceReplicas:
        return cls(
            settings.replica_source,
            open_channel=open_channel,
            routing=settings.inference_routing,
            load_factor=settings.routing_load_factor,
            load_floor=settings.routing_load_floor,
            down_seconds=settings.replica_down_seconds,
            probe_seconds=settings.replica_probe_seconds,
            dns_refresh_seconds=settings.inference_dns_refresh_seconds,
            health_timeout=settings.health_timeout_seconds,
        )

    @classmethod
    def single(cls, channel: grpc.aio.Channel, address: str = "inference") -> InferenceReplicas:
        """One replica over a channel the caller owns (tests, and the one-replica case)."""
        replicas = cls(ReplicaSource(addresses=(address,)), open_channel=_no_channel)
        replicas._replicas[address] = Replica(address, channel, owned=False)
        return replicas

    @property
    def addresses(self) -> list[str]:
        return list(self._replicas)

    async def start(self) -> None:
        if self.source.dns_name:
            await self._resolve()
        else:
            self._update(self.source.addresses)
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for replica in self._replicas.values():
            if replica.owned:
                await replica.channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- membership and health --

    def _update(self, addresses: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(addresses))
        for address in wanted:
            if address not in self._replicas:
                self._replicas[address] = Replica(address, self._open_channel(address), True)
        for address in [a for a in self._replicas if a not in wanted]:
            gone = self._replicas.pop(address)
            log.info("inference replica removed", extra={"replica": address})
            if gone.owned:  # calls still running get a grace period
                task = asyncio.get_running_loop().create_task(gone.channel.close(grace=30))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _resolve(self) -> None:
        """Every address behind the DNS name (a headless Service lists one per ready pod).
        A failed lookup keeps the last known set."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                self.source.dns_name, self.source.dns_port, type=socket.SOCK_STREAM
            )
        except OSError as err:
            log.warning(
                "inference DNS lookup failed",
                extra={"name": self.source.dns_name, "error": repr(err)},
            )
            return
        addresses = sorted({_join(info[4][0], self.source.dns_port) for info in infos})
        self._update(addresses)

    async def _maintain(self) -> None:
        next_resolve = time.monotonic() + self.dns_refresh_seconds
        while True:
            await asyncio.sleep(self.probe_seconds)
            try:
                if self.source.dns_name and time.monotonic() >= next_resolve:
                    await self._resolve()
                    next_resolve = time.monotonic() + self.dns_refresh_seconds
                now = time.monotonic()
                down = [r for r in self._replicas.values() if not r.up(now)]
                await asyncio.gather(*(self._probe(r) for r in down))
            except Exception:  # a bug here must not stop the probing for good
                log.exception("inference replica maintenance failed")

    async def _probe(self, replica: Replica) -> str:
        """The replica's health ("ok", or what it said); a SERVING answer brings a replica
        that was marked down back at once."""
        try:
            reply = await replica.health.Check(
                health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE),
                timeout=self.health_timeout,
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        replica.down_until = 0.0
        return "ok"

    async def health(self) -> str:
        """At least one replica serving: "ok"; else what the first one answered."""
        replicas = list(self._replicas.values())
        if not replicas:
            return "NO_REPLICA"
        states = await asyncio.gather(*(self._probe(r) for r in replicas))
        return "ok" if "ok" in states else states[0]

    def _failed(self, replica: Replica, err: grpc.aio.AioRpcError) -> None:
        if is_transport_failure(err):
            if replica.up(time.monotonic()):
                log.warning(
                    "inference replica marked down",
                    extra={"replica": replica.address, "error": err.details()},
                )
            replica.down_until = time.monotonic() + self.down_seconds

    def _retry_or_raise(
        self, err: grpc.aio.AioRpcError, replica: Replica, tried: list[Replica], retriable: bool
    ) -> None:
        """After a failed call: return to retry it on another replica (once, and only for an
        UNAVAILABLE), else raise. When no replica is left, NO_REPLICA says so."""
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            raise err
        self._failed(replica, err)
        others = [r for r in self.live() if r not in tried]
        if retriable and len(tried) == 1 and others:
            return
        if is_transport_failure(err) and not self.live():
            raise no_replica() from err
        raise err

    def live(self) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self._replicas.values() if r.up(now)]

    def choose(self, key: str, exclude: Iterable[Replica] = ()) -> Replica:
        """The replica for a request with this routing key (empty: no affinity)."""
        excluded = set(exclude)
        live = [r for r in self.live() if r not in excluded]
        if not live:
            raise no_replica()
        if self.routing == "round_robin":
            return live[next(self._round_robin) % len(live)]
        by_address = {r.address: r for r in live}
        in_flight = {r.address: r.in_flight for r in live}
        if not key:  # the base model: the least loaded
            return min(live, key=lambda r: r.in_flight)
        ranked = rendezvous_rank(key, by_address)
        return by_address[bounded_choice(ranked, in_flight, self.load_factor, self.load_floor)]

    # -- calls --

    async def _unary(self, method: str, request: Any, key: str, **kwargs: Any) -> Any:
        tried: list[Replica] = []
        while True:
            replica = self.choose(key, tried)
            tried.append(replica)
            replica.in_flight += 1
            try:
                return await getattr(replica.stub, method)(request, **kwargs)
            except grpc.aio.AioRpcError as err:
                self._retry_or_raise(err, replica, tried, method not in _NOT_IDEMPOTENT)
            finally:
                replica.in_flight -= 1

    async def Generate(self, request: pb.GenerateRequest, **kwargs: Any) -> pb.GenerateResponse:
        return await self._unary("Generate", request, routing_key(request), **kwargs)

    def GenerateStream(self, request: pb.GenerateRequest, **kwargs: Any) -> RoutedStream:
        return RoutedStream(self, request, kwargs)

    async def each(self, method: str, request: Any, **kwargs: Any) -> list[tuple[str, Any]]:
        """The RPC on every live replica: (address, reply) of those that answered."""
        replicas = self.live()
        if not replicas:
            raise no_replica()
        calls = [getattr(r.stub, method)(request, **kwargs) for r in replicas]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        answered = []
        for replica, reply in zip(replicas, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError) and is_transport_failure(reply):
                self._failed(replica, reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                answered.append((replica.address, reply))
        if not answered:
            raise no_replica()
        return answered

    async def CacheStats(
        self, request: pb.CacheStatsRequest, **kwargs: Any
    ) -> pb.CacheStatsResponse:
        """Every replica's cache, as one."""
        return merge_cache_stats(
            [reply for _, reply in await self.each("CacheStats", request, **kwargs)]
        )

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, **kwargs: Any
    ) -> pb.LoadAdapterResponse:
        """Load (and pin or unpin) on every replica: a pinned adapter stays cached wherever
        its requests may spill. The answer is its first-ranked replica's."""
        replies = dict(await self.each("LoadAdapter", request, **kwargs))
        key = routing_key(pb.GenerateRequest(tenant=request.tenant, adapter=request.adapter))
        return replies[rendezvous_rank(key, replies)[0]]

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, **kwargs: Any
    ) -> pb.UnloadAdapterResponse:
        replies = await self.each("UnloadAdapter", request, **kwargs)
        return pb.UnloadAdapterResponse(was_loaded=any(r.was_loaded for _, r in replies))

    def __getattr__(self, method: str) -> Callable[..., Any]:
        """Any other RPC (registry, swaps, model info, embeddings): state shared in Redis,
        so one live replica answers for all."""
        if method not in _METHODS:
            raise AttributeError(method)

        async def call(request: Any, **kwargs: Any) -> Any:
            return await self._unary(method, request, "", **kwargs)

        return call


class RoutedStream:
    """GenerateStream on the chosen replica, retried once on another when it fails with
    UNAVAILABLE before its first message (nothing has reached the client yet). Iterate it
    once; cancel() ends the running call."""

    def __init__(self, replicas: InferenceReplicas, request: Any, kwargs: dict) -> None:
        self._replicas, self._request, self._kwargs = replicas, request, kwargs
        self._call: Any = None

    def __aiter__(self) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[pb.GenerateStreamResponse]:
        replicas, tried = self._replicas, []
        key = routing_key(self._request)
        while True:
            replica = replicas.choose(key, tried)
            tried.append(replica)
            replica.in_flight += 1
            self._call = replica.stub.GenerateStream(self._request, **self._kwargs)
            # Counted until the call ends, however it ends (a client that leaves cancels it
            # while this generator waits at its yield).
            self._call.add_done_callback(lambda _, r=replica: r.call_ended())
            received = False
            try:
                async for message in self._call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as err:
                replicas._retry_or_raise(err, replica, tried, retriable=not received)

    def cancel(self) -> bool:
        return self._call.cancel() if self._call is not None else False


def merge_cache_stats(replies: Sequence[pb.CacheStatsResponse]) -> pb.CacheStatsResponse:
    """Several replicas' cache statistics as one: counts add up, latency percentiles are
    the worst replica's, adapter lists interleave (most recently used first, an adapter
    cached on two replicas listed once with their hits added)."""
    merged = pb.CacheStatsResponse()
    for reply in replies:
        for name in ("capacity_bytes", "used_bytes", "entries", "hits", "misses", "evictions"):
            setattr(merged, name, getattr(merged, name) + getattr(reply, name))
        merged.load_seconds_total += reply.load_seconds_total
        merged.load_seconds_p50 = max(merged.load_seconds_p50, reply.load_seconds_p50)
        merged.load_seconds_p95 = max(merged.load_seconds_p95, reply.load_seconds_p95)
    merged.adapters.extend(_merge_adapters([r.adapters for r in replies]))
    tiers: dict[str, pb.CacheTierStats] = {}
    for reply in replies:
        for tier in reply.tiers:
            into = tiers.setdefault(tier.tier, pb.CacheTierStats(tier=tier.tier))
            for name in (
                "capacity_bytes",
                "used_bytes",
                "entries",
                "hits",
                "misses",
                "evictions",
                "expirations",
                "pinned",
            ):
                setattr(into, name, getattr(into, name) + getattr(tier, name))
            into.ttl_seconds = tier.ttl_seconds
            for name in ("load_seconds_p50", "load_seconds_p95", "load_seconds_p99"):
                setattr(into, name, max(getattr(into, name), getattr(tier, name)))
    for name, tier in tiers.items():
        tier.adapters.extend(
            _merge_adapters([t.adapters for r in replies for t in r.tiers if t.tier == name])
        )
    merged.tiers.extend(tiers.values())
    return merged


def _merge_adapters(lists: Sequence[Sequence[pb.CachedAdapter]]) -> list[pb.CachedAdapter]:
    merged: dict[tuple[str, str, int], pb.CachedAdapter] = {}
    for entry in itertools.chain.from_iterable(itertools.zip_longest(*lists)):
        if entry is None:
            continue
        identity = (entry.tenant, entry.name, entry.version)
        if identity in merged:
            merged[identity].hits += entry.hits
        else:
            merged[identity] = pb.CachedAdapter()
            merged[identity].CopyFrom(entry)
    return list(merged.values())


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _no_channel(address: str) -> grpc.aio.Channel:
    raise RuntimeError(f"a single-channel InferenceReplicas cannot open {address}")
