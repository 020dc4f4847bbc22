"""vLLM's own routes, for users migrating from it: runtime LoRA loading and unloading
(admin key, for the tenant X-Loraplex-Tenant names) and the tokenizer (tenant key).

`lora_path` is read on the gateway's file system, only inside the directory the operator
set (LORA_LOAD_DIR), and becomes a registration like an upload to
POST /admin/tenants/{tenant}/adapters: the same checks (safetensors only), a new version
when the name exists.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from gateway.deps import GatewayDep, TenantDep, require_admin_for_tenant
from gateway.fields import INT32_MAX
from gateway.openai_schemas import ChatMessageIn, parse_model
from gateway.protojson import proto_to_json
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.inference.store import CONFIG_FILE, WEIGHTS_FILE

router = APIRouter(tags=["vllm"])

AdminForTenantDep = Annotated[str, Depends(require_admin_for_tenant)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Strict(BaseModel):
    # vLLM options we do not implement are refused by name rather than ignored.
    model_config = ConfigDict(extra="forbid")


class LoadLoraAdapter(_Strict):
    lora_name: str = Field(min_length=1)
    # Absolute, or relative to LORA_LOAD_DIR; either way it must resolve inside it.
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapter(_Strict):
    lora_name: str = Field(min_length=1)


class TokenizeBody(_Strict):
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(_Strict):
    model: str = Field(min_length=1)
    tokens: list[TokenId]


def _inside(root: Path, path: Path) -> Path:
    """path with every symlink and `..` resolved, if that is inside root (already resolved)."""
    try:
        resolved = path.resolve()
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        raise InvalidArgument("lora_path is not a usable path", reason="BAD_INPUT") from None
    if not resolved.is_relative_to(root):
        raise PermissionDenied(
            "lora_path must be inside the directory the operator allows (LORA_LOAD_DIR)",
            reason="LORA_PATH_OUTSIDE_DIR",
        )
    return resolved


def read_lora_dir(allowed: Path | None, lora_path: str, max_bytes: int) -> list[pb.AdapterFile]:
    """The PEFT files of lora_path: adapter_config.json and adapter_model.safetensors only
    (a pickle checkpoint is never read), each resolved inside the allowed directory."""
    if allowed is None:
        raise FailedPrecondition(
            "loading adapters from a path is disabled: the operator has not set LORA_LOAD_DIR "
            "(or upload the files to POST /admin/tenants/{tenant}/adapters)",
            reason="LORA_LOAD_DIR_UNSET",
        )
    root = allowed.resolve()
    directory = _inside(root, root / lora_path)  # an absolute lora_path replaces root
    if not directory.is_dir():
        raise NotFound(f"no adapter directory at {lora_path!r}", reason="LORA_PATH_NOT_FOUND")
    if not (directory / WEIGHTS_FILE).exists() and any(directory.glob("adapter_model.*")):
        raise InvalidArgument(
            f"{lora_path!r} has no {WEIGHTS_FILE}: only safetensors adapters are loaded "
            "(save with safe_serialization=True)",
            reason="PICKLE_REFUSED",
        )
    files = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = _inside(root, directory / name)
        if not path.is_file():
            raise InvalidArgument(f"{lora_path!r} has no {name}", reason="MISSING_FILE")
        if path.stat().st_size > max_bytes:
            raise InvalidArgument(
                f"{name} is larger than the upload limit of {max_bytes} bytes",
                reason="LORA_FILE_TOO_LARGE",
            )
        files.append(pb.AdapterFile(name=name, content=path.read_bytes()))
    return files


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(
    body: LoadLoraAdapter, tenant: AdminForTenantDep, gateway: GatewayDep
) -> dict[str, Any]:
    """Register the adapter at lora_path (inside LORA_LOAD_DIR) as the tenant's lora_name:
    its first version, or a new one that serves from now on."""
    settings = gateway.settings
    files = await asyncio.to_thread(
        read_lora_dir, settings.lora_load_dir, body.lora_path, settings.max_upload_bytes
    )
    request = pb.RegisterAdapterRequest(tenant=tenant, name=body.lora_name, files=files)
    reply = await gateway.inference.RegisterAdapter(request, timeout=gateway.timeout)
    return {
        "message": f"Success: LoRA adapter '{body.lora_name}' added successfully.",
        "adapter": proto_to_json(reply.adapter),
    }


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(
    body: UnloadLoraAdapter, tenant: AdminForTenantDep, gateway: GatewayDep
) -> dict[str, Any]:
    """Drop the adapter's serving version from every cache tier. It stays registered (and
    is loaded again by the next request that names it): versions are kept for rollback."""
    request = pb.UnloadAdapterRequest(
        tenant=tenant, adapter=common_pb2.AdapterRef(name=body.lora_name)
    )
    reply = await gateway.inference.UnloadAdapter(request, timeout=gateway.timeout)
    return {
        "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
        "was_loaded": reply.was_loaded,
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, tenant: TenantDep, gateway: GatewayDep) -> dict[str, Any]:
    """vLLM's shape: `prompt` or chat `messages`; the base model's tokenizer, for a `model`
    the tenant can use."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidArgument("give either `prompt` or `messages`", reason="BAD_INPUT")
    info = await gateway.model_info()
    request = pb.TokenizeRequest(
        tenant=tenant,
        adapter=parse_model(body.model, info.model_id),
        prompt=body.prompt or "",
        messages=[m.to_proto() for m in body.messages or []],
        add_special_tokens=body.add_special_tokens,
        add_generation_prompt=body.add_generation_prompt,
        return_token_strs=body.return_token_strs,
    )
    reply = await gateway.inference.Tokenize(request, timeout=gateway.timeout)
    return {
        "count": len(reply.tokens),
        "max_model_len": reply.max_model_len,
        "tokens": list(reply.tokens),
        "token_strs": list(reply.token_strs) if body.return_token_strs else None,
    }


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeBody, tenant: TenantDep, gateway: GatewayDep
) -> dict[str, str]:
    info = await gateway.model_info()
    request = pb.DetokenizeRequest(
        tenant=tenant, adapter=parse_model(body.model, info.model_id), tokens=body.tokens
    )
    reply = await gateway.inference.Detokenize(request, timeout=gateway.timeout)
    return {"prompt": reply.prompt}
