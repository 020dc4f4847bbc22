"""The gateway's CandidateExporter: every completion becomes an active-learning candidate,
sent off the request path (SubmitCandidates, grouped by tenant; candidate ids are
completion ids, so a retried batch is stored once), a BatchExporter
(services/common/batch_exporter.py) whose send is SubmitCandidates.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import grpc

from loraplex.activelearning.v1 import activelearning_service_pb2 as alpb
from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as alpb_grpc
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from services.common.batch_exporter import BatchExporter

log = logging.getLogger(__name__)


def prompt_text(prompt: str, messages: Sequence[ipb.ChatMessage]) -> str:
    """The prompt a reviewer sees: the completion prompt, or the chat as "role: content"
    lines (the model's own chat template is the inference service's business)."""
    return prompt or "\n".join(f"{m.role}: {m.content}" for m in messages)


def candidate_from_reply(
    request_id: str,
    prompt: str,
    reply: ipb.GenerateResponse,
    base_model: str,
    experiment: str = "",
    variant: str = "",
    unit_id: str = "",
) -> alpb.Candidate:
    served = reply.adapter if reply.adapter.name else common_pb2.AdapterRef(name=base_model)
    return alpb.Candidate(
        id=request_id,
        prompt=prompt,
        output=reply.text,
        adapter=served,
        experiment=experiment,
        variant=variant,
        unit_id=unit_id if experiment else "",
        token_logprobs=reply.token_logprobs,
        token_entropies=reply.token_entropies,
        token_texts=reply.token_texts,
    )


class CandidateExporter(BatchExporter[tuple[str, alpb.Candidate]]):
    """record((tenant, candidate)) never blocks; batches go out as SubmitCandidates."""

    def __init__(
        self, channel: grpc.aio.Channel, *, timeout_seconds: float = 5.0, **options: Any
    ) -> None:
        self._stub = alpb_grpc.ActiveLearningServiceStub(channel)
        self._timeout = timeout_seconds
        super().__init__(self._submit, name="candidates", **options)

    def completion(
        self,
        tenant: str,
        request: ipb.GenerateRequest,
        reply: ipb.GenerateResponse,
        route: Any,
        base_model: str,
    ) -> None:
        """One served completion (route: openai_routes.Route) as a candidate. Outputs
        without generated tokens have nothing to score and are not sent."""
        if not reply.token_logprobs or not reply.text.strip():
            return
        labels = (route.experiment, route.variant) if route.in_experiment else ("", "")
        candidate = candidate_from_reply(
            request.request_id,
            prompt_text(request.prompt, request.messages),
            reply,
            base_model,
            *labels,
            getattr(route, "unit", ""),
        )
        self.record((tenant, candidate))

    async def _submit(
        self, items: list[tuple[str, alpb.Candidate]], _batch_id: str
    ) -> tuple[int, int]:
        by_tenant: dict[str, list[alpb.Candidate]] = defaultdict(list)
        for tenant, candidate in items:
            by_tenant[tenant].append(candidate)
        accepted = rejected = 0
        for tenant, candidates in by_tenant.items():
            reply = await self._stub.SubmitCandidates(
                alpb.SubmitCandidatesRequest(tenant=tenant, candidates=candidates),
                timeout=self._timeout,
            )
            accepted += reply.accepted + reply.duplicates
            rejected += len(reply.rejected)
        return accepted, rejected
