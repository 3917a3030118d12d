"""The Python SDK for trainers and applications: typed clients over the mesh's client factory.

One import gives every client::

    from guardmesh.sdk import Mesh

    with Mesh() as mesh:
        mesh.scheduler      # SchedulerClient: submit, wait for placement, hold leases, release
        mesh.paramserver("model-name")   # ParamServerClient: pull, push, train_step
        mesh.scorer         # ScorerClient: register modules, score, feedback, drift
        mesh.abrouter       # ABRouterClient: experiments, assign, route, metrics, audit, analysis

Every client opens its channel through :func:`guardmesh.client.open_channel` (discovery, deadlines,
retries on UNAVAILABLE, tracing, TLS and the role token from ``[security]``), accepts
``config: MeshConfig | None`` and an ``address`` override, and is a context manager. Server errors are
raised as :class:`grpc.RpcError`. See ``docs/sdk.md``.
"""

from guardmesh.sdk.abrouter import (
    ABRouterClient,
    Analysis,
    Arm,
    Assignment,
    AuditReport,
    Bandit,
    BatchAssignment,
    Experiment,
    ExperimentOptions,
    Guardrail,
    Imbalance,
    MetricEffect,
    Observation,
    Routed,
    SampleRatio,
    experiment_spec,
)
from guardmesh.sdk.mesh import Mesh, TrainSummary, train_loop
from guardmesh.sdk.paramserver import (
    ParamServerClient,
    PullResult,
    StalePush,
    StepReport,
    adam,
    asynchronous,
    bounded_staleness,
    momentum,
    sgd,
    sync,
)
from guardmesh.sdk.scheduler import (
    EventKind,
    GpuAssignment,
    Job,
    JobEnded,
    JobEvent,
    JobOptions,
    JobState,
    Lease,
    Placement,
    PlacementTimeout,
    Renewal,
    SchedulerClient,
    job_spec,
)
from guardmesh.sdk.scorer import (
    DriftReport,
    FeatureDrift,
    FeedbackResult,
    ItemError,
    ModelLine,
    ModelVersion,
    Registered,
    Rule,
    Score,
    ScorerClient,
    ScorerEvent,
)

__all__ = [
    "ABRouterClient",
    "Analysis",
    "Arm",
    "Assignment",
    "AuditReport",
    "Bandit",
    "BatchAssignment",
    "DriftReport",
    "EventKind",
    "Experiment",
    "ExperimentOptions",
    "FeatureDrift",
    "FeedbackResult",
    "GpuAssignment",
    "Guardrail",
    "Imbalance",
    "ItemError",
    "Job",
    "JobEnded",
    "JobEvent",
    "JobOptions",
    "JobState",
    "Lease",
    "Mesh",
    "MetricEffect",
    "ModelLine",
    "ModelVersion",
    "Observation",
    "ParamServerClient",
    "Placement",
    "PlacementTimeout",
    "PullResult",
    "Registered",
    "Renewal",
    "Routed",
    "Rule",
    "SampleRatio",
    "SchedulerClient",
    "Score",
    "ScorerClient",
    "ScorerEvent",
    "StalePush",
    "StepReport",
    "TrainSummary",
    "adam",
    "asynchronous",
    "bounded_staleness",
    "experiment_spec",
    "job_spec",
    "momentum",
    "sgd",
    "sync",
    "train_loop",
]
