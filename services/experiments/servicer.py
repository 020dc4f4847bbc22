"""gRPC servicer: translates protos to ExperimentStore / results calls and back."""

from __future__ import annotations

import prometheus_client
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.experiments.v1 import experiments_service_pb2 as pb
from loraplex.experiments.v1 import experiments_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgument
from services.experiments.analytics_source import AnalyticsSource
from services.experiments.core import Assignment, ExperimentStore, Outcome, Update
from services.experiments.model import (
    DEFAULT_PRIMARY,
    Experiment,
    Goal,
    Metric,
    MetricKind,
    Namespace,
    Status,
    Variant,
    VariantAdapter,
)
from services.experiments.reporting import experiment_results
from services.experiments.results import Recommendation, Results
from services.experiments.settings import ExperimentsSettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExperimentsService"].full_name
SRM_DETECTED = prometheus_client.Gauge(
    "loraplex_experiment_srm_detected",
    "1 when the experiment's last computed results (GetResults) flagged a sample-ratio "
    "mismatch, else 0.",
    ["tenant", "experiment"],
)

_STATUS = {
    Status.DRAFT: pb.EXPERIMENT_STATUS_DRAFT,
    Status.RUNNING: pb.EXPERIMENT_STATUS_RUNNING,
    Status.STOPPED: pb.EXPERIMENT_STATUS_STOPPED,
}
_STATUS_IN = {v: k for k, v in _STATUS.items()}
_KIND = {MetricKind.RATE: pb.METRIC_KIND_RATE, MetricKind.MEAN: pb.METRIC_KIND_MEAN}
_KIND_IN = {v: k for k, v in _KIND.items()}
_GOAL = {Goal.INCREASE: pb.METRIC_GOAL_INCREASE, Goal.DECREASE: pb.METRIC_GOAL_DECREASE}
_GOAL_IN = {v: k for k, v in _GOAL.items()}
_ACTION = {pb.EXPERIMENT_ACTION_START: "start", pb.EXPERIMENT_ACTION_STOP: "stop"}
_UPDATABLE = {
    "traffic_weights",
    "coverage",
    "description",
    "minimum_detectable_effect",
    "target_power",
    "alpha",
}


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def metric_to_pb(metric: Metric) -> pb.Metric:
    return pb.Metric(name=metric.name, kind=_KIND[metric.kind], goal=_GOAL[metric.goal])


def metric_from_pb(metric: pb.Metric) -> Metric:
    return Metric(
        metric.name,
        _KIND_IN.get(metric.kind, MetricKind.RATE),
        _GOAL_IN.get(metric.goal, Goal.INCREASE),
    )


def variant_to_pb(variant: Variant) -> pb.Variant:
    return pb.Variant(
        name=variant.name,
        adapters=[
            pb.VariantAdapter(name=a.name, version=a.version, weight=a.weight)
            for a in variant.adapters
        ],
        traffic_weight=variant.traffic_weight,
    )


def experiment_to_pb(exp: Experiment) -> pb.Experiment:
    ns = exp.namespace
    return pb.Experiment(
        key=exp.key,
        tenant=exp.tenant,
        description=exp.description,
        variants=[variant_to_pb(v) for v in exp.variants],
        coverage=exp.coverage,
        hash_seed=exp.hash_seed,
        hash_version=exp.hash_version,
        namespace=pb.Namespace(name=ns.name, range_start=ns.start, range_end=ns.end)
        if ns
        else None,
        status=_STATUS[exp.status],
        primary_metric=metric_to_pb(exp.primary_metric),
        guardrail_metrics=[metric_to_pb(m) for m in exp.guardrail_metrics],
        minimum_detectable_effect=exp.minimum_detectable_effect,
        target_power=exp.target_power,
        alpha=exp.alpha,
        bucket_version=exp.bucket_version,
        create_time=_timestamp(exp.create_time),
        update_time=_timestamp(exp.update_time),
        start_time=_timestamp(exp.start_time),
        stop_time=_timestamp(exp.stop_time),
    )


def experiment_from_pb(tenant: str, msg: pb.Experiment) -> Experiment:
    return Experiment(
        key=msg.key,
        tenant=tenant,
        description=msg.description,
        variants=tuple(
            Variant(
                v.name,
                tuple(VariantAdapter(a.name, a.version, a.weight) for a in v.adapters),
                v.traffic_weight,
            )
            for v in msg.variants
        ),
        coverage=msg.coverage if msg.HasField("coverage") else 1.0,
        hash_seed=msg.hash_seed,
        hash_version=msg.hash_version or 2,
        namespace=Namespace(msg.namespace.name, msg.namespace.range_start, msg.namespace.range_end)
        if msg.HasField("namespace")
        else None,
        primary_metric=metric_from_pb(msg.primary_metric)
        if msg.HasField("primary_metric")
        else DEFAULT_PRIMARY,
        guardrail_metrics=tuple(metric_from_pb(m) for m in msg.guardrail_metrics),
        minimum_detectable_effect=msg.minimum_detectable_effect,
        target_power=msg.target_power,
        alpha=msg.alpha,
    )


def assignment_to_pb(result: Assignment) -> pb.AssignResponse:
    return pb.AssignResponse(
        in_experiment=result.in_experiment,
        variant_index=result.variant_index,
        variant=variant_to_pb(result.serving),
        bucket=result.bucket,
        sticky=result.sticky,
        bucket_version=result.experiment.bucket_version,
    )


_RECOMMENDATION = {
    Recommendation.SHIP: pb.RECOMMENDATION_SHIP,
    Recommendation.KEEP_RUNNING: pb.RECOMMENDATION_KEEP_RUNNING,
    Recommendation.STOP: pb.RECOMMENDATION_STOP,
}


def results_to_pb(res: Results) -> pb.GetResultsResponse:
    names = [v.name for v in res.experiment.variants]
    metrics = []
    for mr in res.metrics:
        metrics.append(
            pb.MetricResult(
                metric=metric_to_pb(mr.metric),
                guardrail=mr.guardrail,
                stats=[
                    pb.VariantMetricStats(
                        variant=names[i],
                        units=int(a.n),
                        sum=a.sum,
                        sum_squares=a.sum_squares,
                        design_effect=mr.design_effects[i],
                        effective_units=mr.effective[i].n,
                    )
                    for i, a in enumerate(mr.aggregates)
                ],
                comparisons=[
                    pb.VariantComparison(
                        variant=c.variant,
                        control_mean=c.comparison.control_mean,
                        variant_mean=c.comparison.variant_mean,
                        absolute_lift=c.comparison.absolute_lift,
                        relative_lift=c.comparison.relative_lift,
                        relative_lift_ci_low=c.comparison.relative_ci[0],
                        relative_lift_ci_high=c.comparison.relative_ci[1],
                        p_value=c.comparison.p_value,
                        adjusted_p_value=c.adjusted_p_value,
                        sequential_p_value=c.sequential.p_value,
                        chance_to_beat_control=c.bayesian.chance_to_beat_control,
                        expected_loss=c.bayesian.expected_loss,
                        significant=c.significant,
                    )
                    for c in mr.comparisons
                ],
                source=mr.source,
                analysis_unit=mr.unit,
            )
        )
    return pb.GetResultsResponse(
        experiment=experiment_to_pb(res.experiment),
        units_per_variant=res.units_per_variant,
        srm_p_value=res.srm_p_value,
        srm_detected=res.srm_detected,
        metrics=metrics,
        required_units_per_variant=res.required_units_per_variant,
        sample_size_reached=res.sample_size_reached,
        recommendation=_RECOMMENDATION[res.recommendation],
        recommendation_reason=res.reason,
        notes=res.notes,
        assignments_per_variant=res.assignments_per_variant,
    )


def update_from_pb(request: pb.UpdateExperimentRequest) -> Update:
    paths = set(request.update_mask.paths)
    unknown = paths - _UPDATABLE
    if unknown:
        raise InvalidArgument(
            f"cannot update {sorted(unknown)}; updatable: {sorted(_UPDATABLE)}",
            reason="BAD_UPDATE_MASK",
        )
    if request.action and request.action not in _ACTION:
        raise InvalidArgument("unknown action", reason="BAD_ACTION")
    msg = request.experiment
    return Update(
        action=_ACTION.get(request.action),
        traffic_weights={v.name: v.traffic_weight for v in msg.variants}
        if "traffic_weights" in paths
        else None,
        coverage=msg.coverage if "coverage" in paths else None,
        description=msg.description if "description" in paths else None,
        minimum_detectable_effect=msg.minimum_detectable_effect
        if "minimum_detectable_effect" in paths
        else None,
        target_power=msg.target_power if "target_power" in paths else None,
        alpha=msg.alpha if "alpha" in paths else None,
        bump_bucket_version=request.bump_bucket_version,
    )


class ExperimentsServicer(pb_grpc.ExperimentsServiceServicer):
    def __init__(
        self,
        store: ExperimentStore,
        settings: ExperimentsSettings,
        analytics: AnalyticsSource | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.analytics = analytics

    async def CreateExperiment(self, request, context):
        exp = await self.store.create(experiment_from_pb(request.tenant, request.experiment))
        return pb.CreateExperimentResponse(experiment=experiment_to_pb(exp))

    async def GetExperiment(self, request, context):
        exp = await self.store.get(request.tenant, request.key)
        return pb.GetExperimentResponse(experiment=experiment_to_pb(exp))

    async def ListExperiments(self, request, context):
        exps, token = await self.store.list(
            request.tenant, request.page_size, request.page_token, _STATUS_IN.get(request.status)
        )
        return pb.ListExperimentsResponse(
            experiments=[experiment_to_pb(e) for e in exps], next_page_token=token
        )

    async def UpdateExperiment(self, request, context):
        exp = await self.store.update(request.tenant, request.key, update_from_pb(request))
        return pb.UpdateExperimentResponse(experiment=experiment_to_pb(exp))

    async def Assign(self, request, context):
        result = await self.store.assign(request.tenant, request.experiment_key, request.unit_id)
        return assignment_to_pb(result)

    async def RecordOutcomes(self, request, context):
        recorded, skipped = await self.store.record_outcomes(
            request.tenant,
            [Outcome(o.experiment_key, o.unit_id, o.metric, o.value) for o in request.outcomes],
        )
        return pb.RecordOutcomesResponse(recorded=recorded, skipped=skipped)

    async def GetResults(self, request, context):
        exp = await self.store.get(request.tenant, request.key)
        res = await experiment_results(self.store, exp, self.settings, self.analytics)
        SRM_DETECTED.labels(request.tenant, request.key).set(int(res.srm_detected))
        return results_to_pb(res)
