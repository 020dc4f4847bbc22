"""Candidate versions: trained adapters waiting for their A/B test, promotion or discard.

The inference registry holds the version itself (registered as a candidate: it never
serves by itself); this service keeps the candidate's life around it:

  lp:{t}:training:candidate:<name>:<version>  string JSON (state, training record, experiment)
  lp:{t}:training:candidates                  zset   "<name>@<version>" -> creation time

States: candidate -> in_experiment -> promoted | discarded (candidate -> promoted |
discarded too). Each change is one compare-and-set script, so of two concurrent promotes
one wins and the other is told the candidate is no longer one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.keys import key
from services.common.names import check_adapter_name, check_tenant
from services.common.paging import decode_page_token, encode_page_token

CANDIDATE, IN_EXPERIMENT, PROMOTED, DISCARDED = (
    "candidate",
    "in_experiment",
    "promoted",
    "discarded",
)
OPEN = (CANDIDATE, IN_EXPERIMENT)


def candidate_key(tenant: str, name: str, version: int) -> str:
    return key(tenant, "training", "candidate", name, version)


def candidates_key(tenant: str) -> str:
    return key(tenant, "training", "candidates")


def member(name: str, version: int) -> str:
    return f"{name}@{version}"


# KEYS[1] candidate; ARGV: allowed states (comma-separated), changes JSON, now. Returns the
# new record, or {err = 'STATE:<state>'} / {err = 'NOT_FOUND'}.
_TRANSITION = """
local raw = redis.call('GET', KEYS[1])
if not raw then return redis.error_reply('NOT_FOUND') end
local record = cjson.decode(raw)
local allowed = false
for state in string.gmatch(ARGV[1], '[^,]+') do
  if record['state'] == state then allowed = true end
end
if not allowed then return redis.error_reply('STATE:' .. record['state']) end
for k, v in pairs(cjson.decode(ARGV[2])) do record[k] = v end
record['updated'] = tonumber(ARGV[3])
local out = cjson.encode(record)
redis.call('SET', KEYS[1], out, 'KEEPTTL')
return out
"""


@dataclass
class CandidateRecord:
    tenant: str
    name: str
    version: int
    job_id: str
    record: dict[str, Any]
    state: str = CANDIDATE
    experiment_key: str = ""
    baseline_version: int = 0
    auto_promote: bool = False
    created: float = field(default_factory=time.time)
    updated: float = 0.0

    @property
    def member(self) -> str:
        return member(self.name, self.version)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "member": self.member}

    @classmethod
    def from_json(cls, raw: bytes | str) -> CandidateRecord:
        body = json.loads(raw)
        body.pop("member", None)
        # cjson turns an empty table into {}: an empty record stays a dict
        return cls(**body)


_EXPERIMENT_KEY = re.compile(r"[^a-z0-9_-]+")


def experiment_key_for(name: str, version: int) -> str:
    """A valid experiment key (1-63 of [a-z0-9_-]) derived from the candidate's identity."""
    stem = _EXPERIMENT_KEY.sub("-", name.lower()).strip("-_")[:40] or "adapter"
    return f"cand-{stem}-v{version}"


def parse_member(value: str) -> tuple[str, int]:
    """'<name>@<version>' as the REST paths write a candidate."""
    name, sep, version = value.rpartition("@")
    if not sep or not version.isdigit() or int(version) < 1:
        raise InvalidArgument(
            f"name a candidate as <adapter>@<version>, not {value!r}", reason="BAD_CANDIDATE"
        )
    return check_adapter_name(name), int(version)


class CandidateStore:
    def __init__(self, redis: aioredis.Redis, retention_seconds: int) -> None:
        self.redis = redis
        self.retention = retention_seconds
        self._transition = redis.register_script(_TRANSITION)

    def keys(self, tenant: str, name: str, version: int) -> tuple[str, str]:
        return candidate_key(tenant, name, version), candidates_key(tenant)

    async def get(self, tenant: str, name: str, version: int) -> CandidateRecord:
        check_tenant(tenant)
        check_adapter_name(name)
        raw = await self.redis.get(candidate_key(tenant, name, version))
        if raw is None:
            raise NotFound(
                f"no candidate {name}@{version}: training did not register it",
                reason="CANDIDATE_NOT_FOUND",
            )
        return CandidateRecord.from_json(raw)

    async def list(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[CandidateRecord], str]:
        check_tenant(tenant)
        if page_size < 0 or page_size > 1000:
            raise InvalidArgument("page_size must be in [0, 1000]", reason="BAD_PAGE_SIZE")
        page_size = page_size or 50
        offset = decode_page_token(page_token)
        members = await self.redis.zrevrange(candidates_key(tenant), offset, offset + page_size)
        out = []
        for raw_member in members[:page_size]:
            name, version = parse_member(raw_member.decode())
            raw = await self.redis.get(candidate_key(tenant, name, version))
            if raw is not None:
                out.append(CandidateRecord.from_json(raw))
        token = encode_page_token(offset + page_size) if len(members) > page_size else ""
        return out, token

    async def expire(self, tenant: str, name: str, version: int) -> None:
        await self.redis.expire(candidate_key(tenant, name, version), self.retention)

    async def transition(
        self, candidate: CandidateRecord, allowed: tuple[str, ...], **changes: Any
    ) -> CandidateRecord:
        """Compare-and-set: FAILED_PRECONDITION when the state is not one of `allowed`."""
        try:
            raw = await self._transition(
                keys=[candidate_key(candidate.tenant, candidate.name, candidate.version)],
                args=[",".join(allowed), json.dumps(changes), time.time()],
            )
        except ResponseError as err:
            state = str(err).removeprefix("STATE:")
            if state == "NOT_FOUND":
                raise NotFound(
                    f"no candidate {candidate.member}", reason="CANDIDATE_NOT_FOUND"
                ) from err
            raise FailedPrecondition(
                f"{candidate.member} is {state.replace('_', ' ')}, no longer a candidate",
                reason="NOT_A_CANDIDATE",
                state=state,
            ) from err
        return CandidateRecord.from_json(raw)
