"""K more answers to a candidate's prompt, from the inference service, for the sampling-based
uncertainty scores (services.activelearning.dispersion).

Each candidate is sampled sample_count times under the tenant's adapter version that served
it, with seeds 1..K (so the same candidate always gets the same samples). All generations of
one call are sent at once, up to `concurrency` in flight: the inference scheduler batches
them. A candidate the inference service refuses (its adapter version is gone, the prompt
no longer fits) gets no samples; an unreachable or failing service fails the whole call.

Candidates' prompts are what the gateway stored: a completion prompt as it was, a chat as
"role: content" lines. A prompt whose first line starts with "system: ", "user: " or
"assistant: " is sent back as chat messages (lines that start with no role continue the
message before), so the chat template renders it as it did the first time.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from services.common.errors import Unavailable

_ROLE_LINE = re.compile(r"^(system|user|assistant): ?(.*)$", re.DOTALL)
# The inference service refused this one candidate: it gets no samples, the rest do.
_CANDIDATE_ERRORS = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    adapter: str
    version: int


def chat_messages(prompt: str) -> list[ipb.ChatMessage] | None:
    """The chat the gateway flattened into "role: content" lines, or None (a plain prompt)."""
    lines = prompt.split("\n")
    if not _ROLE_LINE.match(lines[0]):
        return None
    messages: list[ipb.ChatMessage] = []
    for line in lines:
        match = _ROLE_LINE.match(line)
        if match:
            messages.append(ipb.ChatMessage(role=match.group(1), content=match.group(2)))
        else:
            messages[-1].content += "\n" + line
    return messages


class Sampler:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        count: int,
        temperature: float,
        max_new_tokens: int,
        concurrency: int,
        timeout_seconds: float,
    ) -> None:
        if count < 2:
            raise ValueError("sample_count must be at least 2: dispersion compares samples")
        self.stub = ipb_grpc.InferenceServiceStub(channel)
        self.count = count
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.timeout_seconds = timeout_seconds
        self._slots = asyncio.Semaphore(concurrency)

    async def sample(
        self, tenant: str, requests: Sequence[SampleRequest]
    ) -> list[list[str] | None]:
        """sample_count texts per request (None where inference refused that candidate)."""
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(self._one(tenant, r) for r in requests)), self.timeout_seconds
            )
        except TimeoutError:
            raise Unavailable(
                f"sampling {len(requests)} candidates took longer than "
                f"{self.timeout_seconds:g} s; ask for a smaller batch",
                reason="SAMPLING_TIMEOUT",
            ) from None

    async def _one(self, tenant: str, request: SampleRequest) -> list[str] | None:
        base = ipb.GenerateRequest(
            tenant=tenant,
            adapter=common_pb2.AdapterRef(name=request.adapter, version=request.version),
        )
        messages = chat_messages(request.prompt)
        if messages is None:
            base.prompt = request.prompt
        else:
            base.messages.extend(messages)
        try:
            replies = await asyncio.gather(*(self._generate(base, i) for i in range(self.count)))
        except grpc.aio.AioRpcError as err:
            if err.code() in _CANDIDATE_ERRORS:
                return None
            raise Unavailable(
                f"the inference service could not sample: {err.code().name}",
                reason="INFERENCE_UNAVAILABLE",
            ) from None
        return replies

    async def _generate(self, base: ipb.GenerateRequest, i: int) -> str:
        request = ipb.GenerateRequest()
        request.CopyFrom(base)
        request.params.CopyFrom(
            ipb.SamplingParams(
                max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=i + 1
            )
        )
        async with self._slots:
            reply = await self.stub.Generate(request)
        return reply.text
