"""The audit log: who changed what. Every successful change made through the admin API,
hot-swaps and rollbacks, experiment definitions and training actions is appended to one
Redis Stream (capped), which the admin reads back (GET /admin/audit). Reads, completions,
assignments, outcomes and feedback are traffic, not changes, and are not logged here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.keys import PLATFORM, key

log = logging.getLogger(__name__)

AUDITED_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Route templates (method and path) whose successful calls are changes worth an entry.
AUDITED_PREFIXES = (
    "/admin/",
    "/composition/",
    "/ab-testing/experiments",
    "/training/",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)
MAX_ENTRIES = 100_000  # the stream is trimmed (approximately) to this many entries
MAX_FIELD = 256  # characters kept of each field (paths carry caller-chosen names)


@dataclass(frozen=True)
class AuditEntry:
    id: str
    at_ms: int
    actor: str  # "admin", or "<scope>:<key id prefix>"
    tenant: str
    action: str  # "POST /admin/tenants/{tenant}/keys"
    path: str
    status: int


class AuditLog:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._stream = key(PLATFORM, "audit")

    async def record(self, actor: str, tenant: str, action: str, path: str, status: int) -> None:
        fields = {
            "at_ms": int(time.time() * 1000),
            "actor": actor[:MAX_FIELD],
            "tenant": tenant[:MAX_FIELD],
            "action": action[:MAX_FIELD],
            "path": path[:MAX_FIELD],
            "status": status,
        }
        await self._redis.xadd(self._stream, fields, maxlen=MAX_ENTRIES, approximate=True)

    async def latest(self, limit: int, tenant: str = "") -> list[AuditEntry]:
        """The newest entries first, of one tenant or all."""
        found: list[AuditEntry] = []
        end = "+"
        while len(found) < limit:
            batch = await self._redis.xrevrange(self._stream, max=end, count=500)
            for entry_id, raw in batch:
                entry = _entry(entry_id, raw)
                if not tenant or entry.tenant == tenant:
                    found.append(entry)
            if len(batch) < 500:
                break
            end = "(" + _text(batch[-1][0])
        return found[:limit]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(entry_id: Any, raw: dict) -> AuditEntry:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return AuditEntry(
        _text(entry_id),
        int(f["at_ms"]),
        f["actor"],
        f["tenant"],
        f["action"],
        f["path"],
        int(f["status"]),
    )


class AuditMiddleware:
    """Appends an entry for each successful change (2xx) once its response is sent. The
    route's authentication put the actor on the request; the tenant is the caller's, or
    the one the admin route names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in AUDITED_METHODS:
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_seeing_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_seeing_status)
        route = getattr(scope.get("route"), "path", "")
        if not (200 <= status < 300 and route.startswith(AUDITED_PREFIXES)):
            return
        state = scope.get("state", {})
        caller = state.get("caller")
        tenant = caller.tenant if caller else scope.get("path_params", {}).get("tenant", "")
        try:
            await scope["app"].state.gateway.audit.record(
                state.get("actor", ""),
                tenant,
                f"{scope['method']} {route}",
                scope["path"],
                status,
            )
        except Exception as err:  # the change is made; losing its entry must not undo it
            log.error("audit entry lost", extra={"action": route, "error": repr(err)})
