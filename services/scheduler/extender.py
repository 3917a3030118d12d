"""kube-scheduler's extender protocol over guardmesh's placement: filter, prioritize, bind and preempt.

kube-scheduler stays in charge of a cluster and calls this adapter over HTTP/JSON for the pods that ask for
the extended resource named by ``[extender] resource_name`` (GPU memory, MiB per GPU). The documents are
those of ``k8s.io/kube-scheduler/extender/v1``: Go field names without JSON tags, so keys are capitalised on
the way out and matched case-insensitively on the way in, as Go's ``encoding/json`` does. The decisions are
the scheduler core's own (the same feasibility filter, policy scores and ``pending_reason`` wording the gRPC
service uses); this module holds no placement logic of its own, only the translation. A pod becomes the
guardmesh job ``pod-<uid>`` pinned to the chosen node by its ``guardmesh.io/node`` label (set by the controller).

Pod annotations (all optional): ``guardmesh.io/gpus`` (GPUs per pod, default 1), ``guardmesh.io/sharing``
(``true`` default: cards may host other pods; ``false``: idle cards only), ``guardmesh.io/qos``
(``guaranteed`` | ``burstable`` | ``best-effort``), ``guardmesh.io/topology`` (``preferred`` |
``required`` | ``none``), ``guardmesh.io/gpu-models`` (comma-separated), ``guardmesh.io/pod-group`` and
``guardmesh.io/pod-group-size`` (a gang: its pods bind all together or not at all), ``guardmesh.io/lease-ttl-s``
(the pod's worker renews its job's lease through the SDK with this TTL, and a lapsed lease evicts the pod;
without it the controller renews the lease while the pod exists, so pods need not speak guardmesh).
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import numpy as np

from guardmesh.config import ExtenderSettings
from guardmesh.errors import GuardmeshError
from services.scheduler.cluster import ClusterState
from services.scheduler.jobs import HOLDS_ALLOCATION, TERMINAL, Job, JobSpec, Qos, ReplicaPlacement, Topology
from services.scheduler.placement import (
    ReplicaShape,
    caps_for,
    feasible_gpus,
    model_mask,
    node_mask,
    place,
    take_milli,
)
from services.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

#: Score range of a HostPriority (``MinExtenderPriority`` and ``MaxExtenderPriority`` in extender/v1).
MIN_PRIORITY, MAX_PRIORITY = 0, 10
#: Label the controller gives every node it registers (its Kubernetes name): jobs are pinned to nodes by it.
NODE_LABEL = "guardmesh.io/node"
ANNOTATION = "guardmesh.io/"
#: Annotations bind writes on the pod for the worker (the runtime reads them through the downward API).
JOB_ANNOTATION = ANNOTATION + "job-id"
UUIDS_ANNOTATION = ANNOTATION + "gpu-uuids"
CAPS_ANNOTATION = ANNOTATION + "gpu-memory-cap-mib"
ENV_ANNOTATION = ANNOTATION + "env"
#: One annotation per variable too (``guardmesh.io/env.CUDA_VISIBLE_DEVICES``), so that a pod's spec can map
#: each onto an environment variable with the downward API (resolved when the container starts, after bind).
ENV_VAR_ANNOTATION = ANNOTATION + "env."
#: Largest request body read (a NodeList of thousands of full Node objects stays well below it), bytes.
MAX_BODY_BYTES = 64 << 20
#: Victim sets up to this size are searched exhaustively for the fewest; larger ones greedily.
EXACT_VICTIM_SEARCH = 8
_QOS = {"guaranteed": Qos.GUARANTEED, "burstable": Qos.BURSTABLE, "best-effort": Qos.BEST_EFFORT}
_TOPOLOGY = {"preferred": Topology.PREFERRED, "required": Topology.REQUIRED, "none": Topology.NONE}


class BadRequest(Exception):
    """The request document breaks the protocol or a field's rule; the message names the field."""


class NotLeader(BadRequest):
    """This scheduler replica stands by: the leader answers (the Service routes to ready pods only)."""


class ClusterApi(Protocol):
    """What bind needs of the Kubernetes API (``services.scheduler.kube.KubeApi`` is the real one)."""

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Merge ``annotations`` into the pod's metadata."""

    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None:
        """Create the pod's Binding to ``node``."""


def field(doc: Any, name: str) -> Any:
    """``doc[name]`` matched case-insensitively, as Go's encoding/json decodes (None when absent or when
    ``doc`` is not an object)."""
    if not isinstance(doc, Mapping):
        return None
    if name in doc:
        return doc[name]
    low = name.lower()
    for key, value in doc.items():
        if isinstance(key, str) and key.lower() == low:
            return value
    return None


@dataclass(frozen=True)
class PodRequest:
    """A pod as guardmesh sees it: who it is and the job it asks for (not yet pinned to a node)."""

    namespace: str
    name: str
    uid: str
    spec: JobSpec
    group: str
    group_size: int

    @property
    def key(self) -> str:
        """``namespace/name`` for messages."""
        return f"{self.namespace}/{self.name}"

    def pinned(self, node: str, attempt: int = 0) -> JobSpec:
        """The job spec pinned to ``node`` (``attempt`` > 0 after an earlier reservation ended)."""
        job_id = self.spec.job_id if attempt == 0 else f"{self.spec.job_id}.{attempt}"
        return replace(self.spec, job_id=job_id, node_selector=((NODE_LABEL, node),))


def job_id_of(uid: str) -> str:
    """The guardmesh job of the pod with ``uid`` (its first reservation)."""
    return f"pod-{uid}"


def pod_uid_of(job_id: str) -> str | None:
    """The pod UID a job was made for, or None for jobs not made by the extender."""
    if not job_id.startswith("pod-"):
        return None
    return job_id[4:].split(".", 1)[0]  # a pod UID holds no dot; ".<n>" numbers later reservations


def _int_annotation(annotations: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = annotations.get(key)
    if raw is None:
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise BadRequest(f"Pod.metadata.annotations[{key}]: must be an integer (got {raw!r})") from None
    if not low <= value <= high:
        raise BadRequest(f"Pod.metadata.annotations[{key}]: must be {low} to {high} (got {value})")
    return value


def _choice_annotation(annotations: Mapping[str, str], key: str, choices: Mapping[str, Any], default: Any) -> Any:
    raw = annotations.get(key)
    if raw is None:
        return default
    value = choices.get(str(raw).strip().lower())
    if value is None:
        raise BadRequest(f"Pod.metadata.annotations[{key}]: must be one of {', '.join(choices)} (got {raw!r})")
    return value


def _memory_request(spec: Mapping[str, Any], resource: str) -> int | None:
    """The pod's GPU memory per GPU, MiB: the extended resource summed over its containers (None: not asked)."""
    total: int | None = None
    containers = field(spec, "containers")
    for i, container in enumerate(containers if isinstance(containers, list) else []):
        resources = field(container, "resources")
        for part in ("limits", "requests"):
            amounts = field(resources, part)
            raw = amounts.get(resource) if isinstance(amounts, Mapping) else None
            if raw is None:
                continue
            try:
                value = int(str(raw))
            except ValueError:
                raise BadRequest(
                    f"Pod.spec.containers[{i}].resources.{part}[{resource}]: "
                    f"must be a whole number of MiB (got {raw!r})"
                ) from None
            if value < 0:
                raise BadRequest(f"Pod.spec.containers[{i}].resources.{part}[{resource}]: must be >= 0")
            total = (total or 0) + value
            break  # Kubernetes requires requests == limits for extended resources: count one of them
    return total


def pod_request(pod: Any, resource: str) -> PodRequest | None:
    """Parse a v1.Pod document; None for a pod that does not ask for ``resource`` (CPU-only: passes through)."""
    if not isinstance(pod, Mapping):
        raise BadRequest("Pod: must be a v1.Pod object")
    meta = field(pod, "metadata") or {}
    spec = field(pod, "spec") or {}
    given = field(meta, "annotations")
    annotations = {str(k): str(v) for k, v in given.items()} if isinstance(given, Mapping) else {}
    mib = _memory_request(spec, resource)
    ours = sorted(
        k
        for k in annotations
        if k.startswith(ANNOTATION) and k not in _OUTPUT_ANNOTATIONS and not k.startswith(ENV_VAR_ANNOTATION)
    )
    if mib is None or mib == 0:
        if ours:
            raise BadRequest(
                f"Pod.spec.containers[].resources: the pod carries {', '.join(ours)} but asks for no {resource}; "
                f"set {resource} (MiB per GPU) in its limits"
            )
        return None
    uid = field(meta, "uid")
    name = field(meta, "name")
    namespace = field(meta, "namespace") or "default"
    if not uid or not isinstance(uid, str):
        raise BadRequest("Pod.metadata.uid: must be set (the extender keys its reservations by pod UID)")
    if not name or not isinstance(name, str):
        raise BadRequest("Pod.metadata.name: must be set")
    group = annotations.get(ANNOTATION + "pod-group", "")
    group_size = _int_annotation(annotations, ANNOTATION + "pod-group-size", 1 if not group else 0, 1, 4096)
    if group and group_size == 0:
        raise BadRequest(f"Pod.metadata.annotations[{ANNOTATION}pod-group-size]: must be set with pod-group")
    priority = field(spec, "priority")
    if not isinstance(priority, int) or isinstance(priority, bool):
        priority = 0  # kube-scheduler sends the resolved integer priority; anything else counts as none
    models = tuple(m.strip() for m in annotations.get(ANNOTATION + "gpu-models", "").split(",") if m.strip())
    job = JobSpec(
        job_id=job_id_of(uid),
        tenant=str(namespace),
        replicas=1,
        gpus_per_replica=_int_annotation(annotations, ANNOTATION + "gpus", 1, 1, 64),
        memory_mib_per_gpu=mib,
        qos=_choice_annotation(annotations, ANNOTATION + "qos", _QOS, Qos.BURSTABLE),
        priority=max(-1000, min(1000, int(priority))),
        allow_sharing=_choice_annotation(annotations, ANNOTATION + "sharing", {"true": True, "false": False}, True),
        allowed_models=models,
        topology=_choice_annotation(annotations, ANNOTATION + "topology", _TOPOLOGY, Topology.PREFERRED),
        # 0: the scheduler's default TTL, renewed by the controller (see the module docstring).
        lease_ttl_s=_int_annotation(annotations, ANNOTATION + "lease-ttl-s", 0, 1, 86_400),
        owner="kubernetes",
    )
    try:
        job.validate()
    except GuardmeshError as err:
        raise BadRequest(f"Pod {namespace}/{name}: {err}") from None
    return PodRequest(str(namespace), str(name), uid, job, group, group_size)


_OUTPUT_ANNOTATIONS = frozenset({JOB_ANNOTATION, UUIDS_ANNOTATION, CAPS_ANNOTATION, ENV_ANNOTATION})


def worker_annotations(placement: ReplicaPlacement, job: Job) -> dict[str, str]:
    """What bind writes on the pod: the job, GPU UUIDs, memory caps and the environment the worker applies."""
    env = placement.env(job.spec.allow_sharing)
    return {
        JOB_ANNOTATION: job.job_id,
        UUIDS_ANNOTATION: ",".join(g.uuid for g in placement.gpus),
        CAPS_ANNOTATION: ",".join(str(g.memory_cap_mib) for g in placement.gpus),
        ENV_ANNOTATION: json.dumps(env, sort_keys=True),
    } | {ENV_VAR_ANNOTATION + name: value for name, value in env.items()}


# -- feasibility and scores over the core's state --------------------------------------------------------


def _node_counts(state: ClusterState, shape: ReplicaShape, feas: np.ndarray) -> np.ndarray:
    """Per node: feasible GPUs (inside the best topology group when the shape requires one group)."""
    if shape.topology == Topology.REQUIRED and shape.gpus > 1:
        per_group = np.bincount(state.gpu_group[feas], minlength=state.group_count)
        counts = np.zeros(len(state.nodes), dtype=np.int64)
        np.maximum.at(counts, state.group_node, per_group)
        return counts
    return np.bincount(state.gpu_node[feas], minlength=len(state.nodes))


def _static_counts(state: ClusterState, shape: ReplicaShape) -> np.ndarray:
    """Per node: GPUs of an allowed model that could hold the request on an empty node."""
    fits = model_mask(state, shape) & (state.gpu_usable >= caps_for(state, shape))
    return np.bincount(state.gpu_node[fits], minlength=len(state.nodes))


def _reason(state: ClusterState, shape: ReplicaShape, n: int, count: int) -> str:
    """Why ``shape`` does not fit on node ``n`` now, in ``pending_reason``'s words."""
    if not node_mask(state, shape)[n]:
        return "node is not live or lacks the request's CPU or host memory"
    models = f" of model {'|'.join(sorted(shape.models))}" if shape.models else ""
    group = " in one topology group" if shape.topology == Topology.REQUIRED and shape.gpus > 1 else ""
    return f"node has {count} of the {shape.describe_need()}{models}{group} needed"


def _node_scores(state: ClusterState, policy: Any, shape: ReplicaShape, nodes: np.ndarray) -> np.ndarray:
    """The policy's score (lower is better) of the best placement on each of ``nodes`` (all feasible)."""
    caps = caps_for(state, shape)
    feas = feasible_gpus(state, shape, caps)
    task = (float(shape.cpu_milli), float(shape.host_memory_mib))
    out = np.full(nodes.shape[0], np.inf)
    if shape.gpus == 1:
        cands = np.flatnonzero(feas)
        scores = policy.gpu_scores(state, cands, take_milli(state, shape, cands, caps), task)
        best = np.full(len(state.nodes), np.inf)
        np.minimum.at(best, state.gpu_node[cands], scores)
        return best[nodes]
    for i, n in enumerate(nodes):
        first = int(state.node_first[n])
        gpus = first + np.flatnonzero(feas[first : first + int(state.node_ngpu[n])])
        take = take_milli(state, shape, gpus, caps)
        pick = np.argsort(policy.gpu_scores(state, gpus, take, task), kind="stable")[: shape.gpus]
        out[i] = policy.set_score(state, int(n), gpus[pick], take[pick], task)
    return out


def to_priority(scores: np.ndarray) -> list[int]:
    """Map policy scores (lower is better, finite) linearly onto 10 (best) .. 0 (worst)."""
    if scores.shape[0] == 0:
        return []
    lo, hi = float(scores.min()), float(scores.max())
    if not hi > lo:
        return [MAX_PRIORITY] * int(scores.shape[0])
    scaled = (hi - scores) / (hi - lo) * (MAX_PRIORITY - MIN_PRIORITY) + MIN_PRIORITY
    return [int(v) for v in np.rint(scaled)]


class Extender:
    """The four verbs over one scheduler core; each answers a JSON-ready document, never raises."""

    def __init__(
        self,
        core: Scheduler | Callable[[], Scheduler | None],
        api: ClusterApi | None,
        settings: ExtenderSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The core, or how to find the leading one (None while this replica stands by).
        self._core_of: Callable[[], Scheduler | None] = core if callable(core) else (lambda: core)
        self.api = api
        self.settings = settings or ExtenderSettings()
        self.clock = clock
        self.resource = self.settings.resource_name
        #: Pods seen by filter, by UID (bind needs the pod, and kube-scheduler sends only its name).
        self.filtered: OrderedDict[str, PodRequest | str] = OrderedDict()
        self._filtered_lock = threading.Lock()
        #: Pod groups waiting in bind: (namespace, group) -> {uid: (pod, node)}.
        self._groups: dict[tuple[str, str], dict[str, tuple[PodRequest, str]]] = {}
        #: Outcome of a group's bind round, by (namespace, group) then uid: "" (bound) or the error.
        self._outcomes: dict[tuple[str, str], dict[str, str]] = {}
        #: Groups whose members are being reserved and published now.
        self._binding: set[tuple[str, str]] = set()
        self._group_changed = threading.Condition()

    @property
    def core(self) -> Scheduler:
        """The scheduler core decisions are made with; NotLeader on a standby replica."""
        core = self._core_of()
        if core is None:
            raise NotLeader("this guardmesh scheduler replica is a standby; retry against the leader")
        return core

    # -- documents in ----------------------------------------------------------------------------------

    def _remember(self, pod: PodRequest | str) -> None:
        """Keep a filtered pod for bind (a CPU-only pod by its UID alone, to say why bind refuses it)."""
        uid = pod if isinstance(pod, str) else pod.uid
        with self._filtered_lock:
            self.filtered[uid] = pod
            self.filtered.move_to_end(uid)
            while len(self.filtered) > self.settings.filtered_pods_kept:
                self.filtered.popitem(last=False)

    @staticmethod
    def _names(args: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]] | None]:
        """Candidate node names, and the Node objects when kube-scheduler sent them (nodeCacheCapable false)."""
        names = field(args, "NodeNames")
        nodes = field(args, "Nodes")
        if nodes is not None:
            items = field(nodes, "items") if isinstance(nodes, Mapping) else None
            if not isinstance(items, list):
                raise BadRequest("Nodes.items: must be a list of v1.Node")
            out = []
            for i, node in enumerate(items):
                name = field(field(node, "metadata") or {}, "name") if isinstance(node, Mapping) else None
                if not isinstance(name, str) or not name:
                    raise BadRequest(f"Nodes.items[{i}].metadata.name: must be a non-empty string")
                out.append(name)
            return out, items
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return list(names), None
        raise BadRequest("ExtenderArgs: set NodeNames (nodeCacheCapable) or Nodes to a list of candidate nodes")

    def _args(self, args: Any) -> tuple[PodRequest | None, list[str], list[dict[str, Any]] | None]:
        if not isinstance(args, Mapping):
            raise BadRequest("ExtenderArgs: must be a JSON object")
        pod = pod_request(field(args, "Pod"), self.resource)
        names, items = self._names(args)
        return pod, names, items

    # -- filter ----------------------------------------------------------------------------------------

    def filter(self, args: Any) -> dict[str, Any]:
        """ExtenderArgs -> ExtenderFilterResult: nodes that fit now, a reason for every one that does not."""
        try:
            pod, names, items = self._args(args)
        except BadRequest as err:
            return self._filter_result([], None, {}, {}, str(err))
        if pod is None:  # a CPU-only pod: nothing of ours to check
            uid = field(field(field(args, "Pod") or {}, "metadata") or {}, "uid")
            if isinstance(uid, str) and uid:
                self._remember(uid)
            return self._filter_result(names, items, {}, {}, "")
        self._remember(pod)
        failed: dict[str, str] = {}
        unresolvable: dict[str, str] = {}
        passed: list[str] = []
        shape = ReplicaShape.of(pod.spec)
        core = self.core
        # A gang member sees the room its waiting group mates will take (and only it sees it: nothing is
        # held for other pods), so kube-scheduler does not stack the whole group on one card.
        waiting = self._waiting_members(pod)
        with core.lock, self._members_placed(core, waiting):
            state = core.state
            counts = np.zeros(0, dtype=np.int64)
            static = counts
            if state.gpu_count:
                counts = _node_counts(state, shape, feasible_gpus(state, shape, caps_for(state, shape)))
                static = _static_counts(state, shape)
            for name in names:
                n = state.node_index.get(name)
                if n is None:
                    unresolvable[name] = f"node {name} has no GPUs registered with guardmesh"
                elif counts[n] >= shape.gpus:
                    passed.append(name)
                elif static[n] < shape.gpus:
                    unresolvable[name] = (
                        f"node has {int(static[n])} GPUs that could ever hold {shape.describe_need()}; "
                        "preemption cannot help"
                    )
                else:
                    failed[name] = _reason(state, shape, n, int(counts[n]))
        return self._filter_result(passed, items, failed, unresolvable, "")

    @staticmethod
    def _filter_result(
        passed: list[str],
        items: list[dict[str, Any]] | None,
        failed: dict[str, str],
        unresolvable: dict[str, str],
        error: str,
    ) -> dict[str, Any]:
        nodes: dict[str, Any] | None = None
        names: list[str] | None = None
        if items is not None:
            keep = set(passed)
            nodes = {"metadata": {}, "items": [n for n in items if field(field(n, "metadata"), "name") in keep]}
        elif not error:
            names = passed
        return {
            "Nodes": nodes,
            "NodeNames": names,
            "FailedNodes": failed,
            "FailedAndUnresolvableNodes": unresolvable,
            "Error": error,
        }

    # -- prioritize ------------------------------------------------------------------------------------

    def prioritize(self, args: Any) -> list[dict[str, Any]]:
        """ExtenderArgs -> HostPriorityList: the policy's score of each node mapped to 0..10 (10 best).

        Raises BadRequest (the HTTP layer answers 400: HostPriorityList has no error field).
        """
        pod, names, _ = self._args(args)
        if pod is None:
            return [{"Host": name, "Score": MIN_PRIORITY} for name in names]
        shape = ReplicaShape.of(pod.spec)
        core = self.core
        waiting = self._waiting_members(pod)
        with core.lock, self._members_placed(core, waiting):
            state = core.state
            index = [state.node_index.get(name, -1) for name in names]
            ok = np.zeros(len(names), dtype=bool)
            if state.gpu_count:
                counts = _node_counts(state, shape, feasible_gpus(state, shape, caps_for(state, shape)))
                ok = np.array([n >= 0 and counts[n] >= shape.gpus for n in index], dtype=bool)
            nodes = np.array([n for n, good in zip(index, ok, strict=True) if good], dtype=np.int64)
            scores = _node_scores(state, core.policy, shape, nodes) if nodes.shape[0] else np.zeros(0)
        mapped = iter(to_priority(scores))
        return [
            {"Host": name, "Score": next(mapped) if good else MIN_PRIORITY}
            for name, good in zip(names, ok, strict=True)
        ]

    # -- bind ------------------------------------------------------------------------------------------

    def bind(self, args: Any) -> dict[str, Any]:
        """ExtenderBindingArgs -> ExtenderBindingResult: reserve in guardmesh, annotate, create the Binding."""
        try:
            pod, node = self._binding_args(args)
            if pod.group:
                return {"Error": self._bind_group(pod, node)}
            return {"Error": self._bind_one(pod, node)}
        except BadRequest as err:
            return {"Error": str(err)}
        except GuardmeshError as err:
            return {"Error": err.message}

    def _binding_args(self, args: Any) -> tuple[PodRequest, str]:
        if not isinstance(args, Mapping):
            raise BadRequest("ExtenderBindingArgs: must be a JSON object")
        values = {k: field(args, k) for k in ("PodName", "PodNamespace", "PodUID", "Node")}
        for key, value in values.items():
            if not isinstance(value, str) or not value:
                raise BadRequest(f"ExtenderBindingArgs.{key}: must be a non-empty string")
        with self._filtered_lock:
            pod = self.filtered.get(values["PodUID"])
        if isinstance(pod, str):
            raise BadRequest(
                f"pod {values['PodNamespace']}/{values['PodName']} asks for no {self.resource}: guardmesh has "
                f"nothing to reserve for it; kube-scheduler binds such pods itself (managedResources)"
            )
        if pod is None or (pod.namespace, pod.name) != (values["PodNamespace"], values["PodName"]):
            raise BadRequest(
                f"pod {values['PodNamespace']}/{values['PodName']} (uid {values['PodUID']}) was never filtered by "
                f"this extender; kube-scheduler filters a pod before binding it"
            )
        with self.core.lock:
            if values["Node"] not in self.core.state.node_index:
                raise BadRequest(
                    f"ExtenderBindingArgs.Node: node {values['Node']!r} has no GPUs registered with guardmesh"
                )
        return pod, values["Node"]

    def _reserve(self, pod: PodRequest, node: str) -> Job:
        """Submit the pod's job pinned to ``node`` (under the core's lock; the caller checked it fits)."""
        attempt = 0
        while True:
            spec = pod.pinned(node, attempt)
            job = self.core.jobs.get(spec.job_id)
            if job is None or (job.state not in TERMINAL and job.spec == spec):
                break
            attempt += 1  # an earlier reservation ended or pointed elsewhere: a fresh job
        n = self.core.state.node_index[node]
        if self.core.state.node_labels[n].get(NODE_LABEL) != node:
            raise BadRequest(
                f"node {node} is registered with guardmesh without the label {NODE_LABEL}={node}; "
                "register Kubernetes nodes through the controller (node annotations or the agent)"
            )
        job = self.core.submit(spec)
        if job.state not in HOLDS_ALLOCATION:  # checked to fit under the same lock: not expected
            self.core.release(job.job_id)
            raise BadRequest(f"pod {pod.key} could not be reserved on {node}: {job.pending_reason}")
        return job

    def _fits(self, pod: PodRequest, node: str) -> bool:
        state = self.core.state
        shape = ReplicaShape.of(pod.spec)
        if not state.gpu_count:
            return False
        counts = _node_counts(state, shape, feasible_gpus(state, shape, caps_for(state, shape)))
        return bool(counts[state.node_index[node]] >= shape.gpus)

    def _unfit_reason(self, pod: PodRequest, node: str) -> str:
        state = self.core.state
        shape = ReplicaShape.of(pod.spec)
        n = state.node_index[node]
        counts = _node_counts(state, shape, feasible_gpus(state, shape, caps_for(state, shape)))
        return f"pod {pod.key} no longer fits on {node}: {_reason(state, shape, n, int(counts[n]))}"

    def _held(self, pod: PodRequest, node: str) -> Job | None:
        """The pod's live reservation on ``node`` (a retried bind finds it), if any."""
        for job in self.core.jobs.values():
            mine = pod_uid_of(job.job_id) == pod.uid and job.state in HOLDS_ALLOCATION
            if mine and job.placements and job.placements[0].node == node:
                return job
        return None

    def _bind_one(self, pod: PodRequest, node: str) -> str:
        with self.core.lock:
            job = self._held(pod, node)
            if job is None:
                if not self._fits(pod, node):
                    return self._unfit_reason(pod, node)
                job = self._reserve(pod, node)
            job = Scheduler.snapshot(job)
        return self._publish([(pod, job)])

    def _publish(self, bound: list[tuple[PodRequest, Job]]) -> str:
        """Annotate each pod and create its Binding; on any API failure release them all (state unchanged)."""
        try:
            if self.api is None:
                raise RuntimeError("no Kubernetes API configured")
            for pod, job in bound:
                self.api.annotate_pod(pod.namespace, pod.name, worker_annotations(job.placements[0], job))
            for pod, job in bound:
                self.api.bind_pod(pod.namespace, pod.name, pod.uid, job.placements[0].node)
        except Exception as exc:  # the API refused or is unreachable: nothing stays held for these pods
            log.warning(
                "bind failed; reservation released", extra={"pods": [p.key for p, _ in bound], "error": str(exc)}
            )
            for _, job in bound:
                self.core.release(job.job_id)
            return f"binding {', '.join(p.key for p, _ in bound)} through the Kubernetes API failed: {exc}"
        return ""

    def _bind_group(self, pod: PodRequest, node: str) -> str:
        """A gang member: wait until the whole group asked to bind, then reserve all or none."""
        key = (pod.namespace, pod.group)
        deadline = self.clock() + self.settings.gang_wait_s
        with self._group_changed:
            members = self._groups.setdefault(key, {})
            members[pod.uid] = (pod, node)
            complete = len(members) >= pod.group_size
            if complete:
                del self._groups[key]
                self._binding.add(key)  # its members wait for the outcome, past their deadline if need be
        if complete:
            # Outside the group lock: the Kubernetes API calls must not hold up other groups or filters.
            outcome = self._bind_members(list(members.values()))
            with self._group_changed:
                self._binding.discard(key)
                own = outcome.pop(pod.uid, "")
                if outcome:
                    self._outcomes[key] = outcome
                self._group_changed.notify_all()
            return own
        with self._group_changed:
            while True:
                outcome = self._outcomes.get(key, {})
                if pod.uid in outcome:
                    error = outcome.pop(pod.uid)
                    if not outcome:
                        self._outcomes.pop(key, None)
                    return error
                left = deadline - self.clock()
                if left <= 0 and key not in self._binding:
                    waiting = self._groups.get(key, {})
                    waiting.pop(pod.uid, None)
                    if not waiting:
                        self._groups.pop(key, None)
                    return (
                        f"pod group {pod.namespace}/{pod.group}: {len(waiting) + 1} of {pod.group_size} pods asked "
                        f"to bind within {self.settings.gang_wait_s:g} s; nothing was reserved"
                    )
                self._group_changed.wait(max(left, 0.05))

    def _waiting_members(self, pod: PodRequest) -> list[tuple[PodRequest, str]]:
        """The other members of ``pod``'s group waiting in bind, with the nodes they were given."""
        if not pod.group:
            return []
        with self._group_changed:
            members = self._groups.get((pod.namespace, pod.group), {})
            return [member for uid, member in members.items() if uid != pod.uid]

    @contextmanager
    def _members_placed(self, core: Scheduler, members: list[tuple[PodRequest, str]]) -> Iterator[str]:
        """Under the core's lock: ``members`` placed on their nodes on a scratch allocation while the block
        runs (undone after it). Yields "" or why a member does not fit beside the others."""
        state = core.state
        scratch: list[str] = []
        failure = ""
        try:
            for pod, node in members:
                if self._held(pod, node) is not None:
                    continue
                # The same choice submit will make: the policy's placement pinned to the node.
                choice = place(state, ReplicaShape.of(pod.pinned(node)), core.policy) if self._fits(pod, node) else None
                if choice is None:
                    failure = f"pod {pod.key} does not fit on {node} beside the rest of its group"
                    break
                held = f"scratch:{pod.uid}"
                state.allocate(held, 0, list(choice.gpus), list(choice.caps), pod.spec.allow_sharing, 0, 0)
                scratch.append(held)
            yield failure
        finally:
            for held in scratch:
                state.free(held)

    def _bind_members(self, members: list[tuple[PodRequest, str]]) -> dict[str, str]:
        """Reserve every member on its node, or none; then publish them. Error per uid ("" when bound)."""
        core = self.core
        with core.lock:
            # Try the group on a scratch allocation first so that a partial group is never submitted.
            with self._members_placed(core, members) as failure:
                pass
            if failure:
                group = members[0][0]
                message = f"pod group {group.namespace}/{group.group}: {failure}; no pod of the group was bound"
                return {pod.uid: message for pod, _ in members}
            bound = [(pod, self._held(pod, node) or self._reserve(pod, node)) for pod, node in members]
            bound = [(pod, Scheduler.snapshot(job)) for pod, job in bound]
        error = self._publish(bound)
        return {pod.uid: error for pod, _ in members}

    # -- preempt ---------------------------------------------------------------------------------------

    def preempt(self, args: Any) -> dict[str, Any]:
        """ExtenderPreemptionArgs -> ExtenderPreemptionResult: per node, the fewest victims that make room.

        Victims that are not guardmesh pods (kube-scheduler chose them for its own resources) are kept;
        of the guardmesh pods proposed, the fewest whose removal lets the pod fit are kept; a node where
        even all of them do not make room is dropped.
        """
        if not isinstance(args, Mapping):
            return {"NodeNameToMetaVictims": {}, "Error": "ExtenderPreemptionArgs: must be a JSON object"}
        try:
            pod = pod_request(field(args, "Pod"), self.resource)
            proposal = self._victims(args)
        except BadRequest as err:
            return {"NodeNameToMetaVictims": {}, "Error": str(err)}
        if pod is None:
            out = {
                node: {"Pods": [{"UID": u} for u in uids], "NumPDBViolations": pdb}
                for node, (uids, pdb) in proposal.items()
            }
            return {"NodeNameToMetaVictims": out}
        out = {}
        with self.core.lock:
            for node, (uids, pdb) in proposal.items():
                if node not in self.core.state.node_index:
                    continue
                chosen = self._fewest(pod, node, uids)
                if chosen is not None:
                    out[node] = {"Pods": [{"UID": u} for u in chosen], "NumPDBViolations": pdb}
        return {"NodeNameToMetaVictims": out}

    @staticmethod
    def _victims(args: Mapping[str, Any]) -> dict[str, tuple[list[str], int]]:
        meta = field(args, "NodeNameToMetaVictims")
        full = field(args, "NodeNameToVictims")
        source = meta if meta else full
        if not isinstance(source, Mapping):
            raise BadRequest("ExtenderPreemptionArgs: set NodeNameToVictims or NodeNameToMetaVictims")
        out: dict[str, tuple[list[str], int]] = {}
        for node, victims in source.items():
            pods = field(victims, "Pods") if isinstance(victims, Mapping) else None
            if not isinstance(pods, list):
                raise BadRequest(f"ExtenderPreemptionArgs victims of {node}: Pods must be a list")
            uids = []
            for i, p in enumerate(pods):
                uid = field(p, "UID") if source is meta else field(field(p, "metadata") or {}, "uid")
                if not isinstance(uid, str) or not uid:
                    raise BadRequest(f"ExtenderPreemptionArgs victims of {node}: Pods[{i}] has no UID")
                uids.append(uid)
            pdb = field(victims, "NumPDBViolations") or 0
            if not isinstance(pdb, int):
                raise BadRequest(f"ExtenderPreemptionArgs victims of {node}: NumPDBViolations must be an integer")
            out[str(node)] = (uids, pdb)
        return out

    def _fewest(self, pod: PodRequest, node: str, uids: list[str]) -> list[str] | None:
        """The proposed victims to keep on ``node``: others as proposed plus the fewest guardmesh pods."""
        core, state = self.core, self.core.state
        jobs_by_uid = {
            pod_uid_of(j.job_id): j for j in core.jobs.values() if j.state in HOLDS_ALLOCATION and pod_uid_of(j.job_id)
        }
        ours = [
            u for u in uids if u in jobs_by_uid and any(rp.node == node for rp in jobs_by_uid[u].placements.values())
        ]
        others = [u for u in uids if u not in ours]
        # Largest reservations first: the greedy order, and the order the exhaustive search tries ties in.
        ours.sort(key=lambda u: -sum(g.memory_cap_mib for rp in jobs_by_uid[u].placements.values() for g in rp.gpus))

        def fits_without(victims: tuple[str, ...]) -> bool:
            freed = [jobs_by_uid[u] for u in victims]
            for job in freed:
                state.free(job.job_id)
            try:
                return self._fits(pod, node)
            finally:
                for job in freed:
                    for rp in job.placements.values():
                        state.allocate(
                            job.job_id,
                            rp.replica,
                            [state.uuid_index[g.uuid] for g in rp.gpus],
                            [g.memory_cap_mib for g in rp.gpus],
                            job.spec.allow_sharing,
                            job.spec.cpu_milli,
                            job.spec.host_memory_mib,
                        )

        if len(ours) <= EXACT_VICTIM_SEARCH:
            for size in range(len(ours) + 1):
                for subset in itertools.combinations(ours, size):
                    if fits_without(subset):
                        return others + list(subset)
            return None
        for size in range(len(ours) + 1):
            if fits_without(tuple(ours[:size])):
                return others + ours[:size]
        return None


# -- HTTP ------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: ExtenderHttpServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        """No Nagle delay: an answer's header and body writes must not wait for the peer's delayed ACK."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("extender http " + format, *args)

    def _answer(self, status: int, doc: Any) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        """``/healthz``: 200 while serving."""
        if self.path.rstrip("/").endswith("/healthz"):
            self._answer(200, {"status": "ok"})
        else:
            self._answer(
                404, {"Error": f"no such path {self.path}; GET /healthz, POST /filter|/prioritize|/bind|/preempt"}
            )

    def do_POST(self) -> None:
        """The four verbs, by the last path segment (kube-scheduler appends the verb to urlPrefix)."""
        verb = self.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        ext = self.server.extender
        handlers: dict[str, Callable[[Any], Any]] = {
            "filter": ext.filter,
            "prioritize": ext.prioritize,
            "bind": ext.bind,
            "preempt": ext.preempt,
        }
        handler = handlers.get(verb)
        if handler is None:
            self._answer(404, {"Error": f"unknown verb {verb!r}; expected filter, prioritize, bind or preempt"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._answer(413, {"Error": f"request body of {length} bytes exceeds {MAX_BODY_BYTES}"})
            return
        raw = self.rfile.read(length)
        try:
            args = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            args = _Malformed(f"request body is not valid JSON: {err}")
        try:
            if isinstance(args, _Malformed):
                raise BadRequest(args.message)
            self._answer(200, handler(args))
        except BadRequest as err:
            # filter, bind and preempt carry the error in their own document; prioritize has none: 400.
            if verb == "prioritize":
                self._answer(503 if isinstance(err, NotLeader) else 400, {"Error": str(err)})
            else:
                self._answer(200, {"Error": str(err)} | ({"NodeNameToMetaVictims": {}} if verb == "preempt" else {}))
        except Exception as exc:  # never a traceback on the wire; the log keeps it
            log.exception("extender verb failed", extra={"verb": verb})
            self._answer(500, {"Error": f"internal error in {verb}: {type(exc).__name__}"})


@dataclass(frozen=True)
class _Malformed:
    message: str


class ExtenderHttpServer(ThreadingHTTPServer):
    """The extender's HTTP(S) endpoint; ``port`` 0 picks a free port (see ``.port``)."""

    daemon_threads = True

    def __init__(self, extender: Extender, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.extender = extender
        if tls is not None:
            # The handshake happens on the connection's own thread, so a slow client never blocks accept().
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self._thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (a refused TLS handshake, a peer that hung up): log it, briefly."""
        log.warning(
            "extender connection failed", extra={"peer": str(client_address)}, exc_info=log.isEnabledFor(logging.DEBUG)
        )

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server_address[1])

    def start(self) -> ExtenderHttpServer:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="extender-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def tls_context(settings: ExtenderSettings) -> ssl.SSLContext | None:
    """The server TLS context from the settings, or None for plain HTTP."""
    if not settings.cert_file and not settings.key_file:
        return None
    if not (settings.cert_file and settings.key_file):
        raise ValueError("extender.cert_file and extender.key_file: set both or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.client_ca_file:
        ctx.load_verify_locations(settings.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def serve_extender(extender: Extender) -> ExtenderHttpServer:
    """Start the endpoint configured by the extender's settings."""
    s = extender.settings
    return ExtenderHttpServer(extender, s.host, s.port, tls_context(s)).start()
