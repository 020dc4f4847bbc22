"""Feedback -> analytics (quality per adapter/variant) and experiments (outcome metric).

Best effort and off the request path: SubmitFeedback only appends to bounded in-memory
queues (BatchExporters, as the gateway's), background tasks send the batches with retries.
A slow or missing analytics or experiments service never slows or fails SubmitFeedback.

- analytics: ratings (1-5) as `feedback` events, RecordBatch with a fresh batch id per batch
  (retries keep it, so a batch is counted once). Thumbs and other kinds have no rating
  scale and are not sent.
- experiments: for outputs served by an experiment variant to an assigned unit, ratings as
  metric "rating" and thumbs as metric "thumbs_up" (1/0), with RecordOutcomes. The
  experiment must define that metric; outcomes for metrics it lacks are dropped (counted).
"""

from __future__ import annotations

from collections import defaultdict

import grpc

from loraplex.analytics.v1 import analytics_service_pb2 as apb
from loraplex.common.v1 import common_pb2
from loraplex.experiments.v1 import experiments_service_pb2 as xpb
from loraplex.experiments.v1 import experiments_service_pb2_grpc as xpb_grpc
from services.activelearning.queue import Item
from services.common.analytics_exporter import AnalyticsExporter
from services.common.batch_exporter import BatchExporter

_SKIPPED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


class FeedbackForwarder:
    def __init__(
        self,
        analytics_channel: grpc.aio.Channel | None = None,
        experiments_channel: grpc.aio.Channel | None = None,
        *,
        flush_interval_seconds: float = 1.0,
    ) -> None:
        options = {"flush_interval_seconds": flush_interval_seconds}
        self.analytics = (
            AnalyticsExporter(analytics_channel, **options) if analytics_channel else None
        )
        self.experiments: BatchExporter[tuple[str, xpb.Outcome]] | None = None
        if experiments_channel is not None:
            self._xstub = xpb_grpc.ExperimentsServiceStub(experiments_channel)
            self.experiments = BatchExporter(
                self._record_outcomes, name="feedback-outcomes", **options
            )

    def start(self) -> None:
        for exporter in (self.analytics, self.experiments):
            if exporter is not None:
                exporter.start()

    async def close(self) -> None:
        for exporter in (self.analytics, self.experiments):
            if exporter is not None:
                await exporter.close()

    def feedback(self, tenant: str, item: Item, kind: str, value: float) -> None:
        """value: the rating (kind "rating") or 1/0 (kind "thumbs"); other kinds are ignored."""
        if kind == "rating" and self.analytics is not None:
            event = apb.Event(
                tenant=tenant,
                adapter=common_pb2.AdapterRef(
                    name=item.get("adapter"), version=int(item.get("version", "0") or 0)
                ),
                experiment=item.get("experiment"),
                variant=item.get("variant"),
                feedback=apb.Feedback(rating=value),
            )
            event.time.GetCurrentTime()
            self.analytics.record(event)
        metric = {"rating": "rating", "thumbs": "thumbs_up"}.get(kind)
        experiment, unit = item.get("experiment"), item.get("unit_id")
        if metric and self.experiments is not None and experiment and unit:
            outcome = xpb.Outcome(
                experiment_key=experiment,
                unit_id=unit,
                metric=metric,
                value=value,
            )
            self.experiments.record((tenant, outcome))

    async def _record_outcomes(
        self, items: list[tuple[str, xpb.Outcome]], _batch_id: str
    ) -> tuple[int, int]:
        groups: dict[tuple[str, str, str], list[xpb.Outcome]] = defaultdict(list)
        for tenant, o in items:
            groups[(tenant, o.experiment_key, o.metric)].append(o)
        recorded = skipped = 0
        for (tenant, _, _), outcomes in groups.items():
            request = xpb.RecordOutcomesRequest(tenant=tenant, outcomes=outcomes)
            try:
                reply = await self._xstub.RecordOutcomes(request, timeout=5.0)
            except grpc.aio.AioRpcError as err:
                if err.code() not in _SKIPPED:  # retried by the exporter
                    raise
                skipped += len(outcomes)  # e.g. the experiment has no such metric
                continue
            recorded += reply.recorded
            skipped += reply.skipped
        return recorded, skipped
