"""Helpers shared by tests: the demo adapters' files and gRPC error inspection."""

from __future__ import annotations

import asyncio
import inspect
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status.rpc_status import GRPC_DETAILS_METADATA_KEY

from services.common.localhost import free_port, start_redis_server
from services.common.redis import is_cluster_url
from services.common.settings import REPO_ROOT

DEMO_ADAPTERS = REPO_ROOT / "models" / "adapters"
DEMO_TENANTS = ("retailer", "bank", "airline")


def database_url(url: str, database: int) -> str:
    """`url` with another database number; a cluster has only database 0, so there the
    same URL (tests keep apart by tenant names instead)."""
    return url if is_cluster_url(url) else url.rsplit("/", 1)[0] + f"/{database}"


async def kill_pubsub_connections(redis) -> None:
    """CLIENT KILL TYPE pubsub on the server, or on every node of a cluster."""
    from redis.asyncio.cluster import RedisCluster

    options = {"target_nodes": redis.get_nodes()} if isinstance(redis, RedisCluster) else {}
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub", **options)


def adapter_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason the server attached to a failed call ('' if none)."""
    for key, value in err.trailing_metadata() or ():
        if key == GRPC_DETAILS_METADATA_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def load_lora_weights(directory: Path, linear_shapes: dict, dtype=None):
    """A PEFT adapter directory parsed into LoraWeights against a base model's linear layers."""
    import torch

    from services.inference.lora import parse_adapter

    files = adapter_files(directory)
    return parse_adapter(
        files["adapter_config.json"],
        files["adapter_model.safetensors"],
        linear_shapes,
        dtype=dtype or torch.float32,
    )


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Polls check() (sync or async) until it gives something truthy; its last result when
    the time is up."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.02)


def new_tenant() -> str:
    """A tenant id no other test uses (tests share one Redis)."""
    return f"t-{uuid.uuid4().hex[:10]}"


async def register(stub, tenant: str, demo: str = "retailer", name: str = "support", **kw):
    """Register a demo adapter's files over gRPC; returns its AdapterInfo."""
    from loraplex.inference.v1 import inference_service_pb2 as pb

    files = adapter_files(DEMO_ADAPTERS / demo)
    request = pb.RegisterAdapterRequest(
        tenant=tenant,
        name=name,
        files=[pb.AdapterFile(name=k, content=v) for k, v in files.items()],
        **kw,
    )
    return (await stub.RegisterAdapter(request)).adapter


def decode_together(runner, sequences: list) -> list:
    """Decode these sequences to the end in one batch, no scheduler: the reference that
    scheduled decoding is compared with. Returns their Generations."""
    from services.inference.decoding import DecodeBatch

    batch = DecodeBatch(runner)
    batch.add(sequences)
    batch.remove_finished()
    while len(batch):
        batch.step()
        batch.remove_finished()
    return [s.result() for s in sequences]


def decode_alone(runner, prompt_ids: list[int], adapter, config):
    """One sequence decoded by itself."""
    from services.inference.decoding import DecodeSequence

    return decode_together(runner, [DecodeSequence(prompt_ids, adapter, config)])[0]


@dataclass
class StoppableRedis:
    """A real redis-server that a test can stop (or kill -9) and start again on the same
    port and directory; `options` as start_redis_server takes them."""

    options: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="loraplex-outage-"))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = start_redis_server(self.port, self.workdir, *self.options)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=10)
