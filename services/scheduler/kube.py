"""The Kubernetes side of the scheduler: the API calls bind needs, and the controller that keeps guardmesh
and the cluster in step.

The controller is level-triggered (as Kubernetes controllers are): each pass reads the nodes and pods from
the API server and the jobs from the scheduler core, and closes the gap idempotently:

* node inventory: a node's ``guardmesh.io/gpus`` annotation (JSON list of GPUs, written by the node agent
  DaemonSet or an operator) registers it with guardmesh, labelled ``guardmesh.io/node=<name>`` so that
  the extender can pin a pod's job to it; a node the agent registered over gRPC gets the label added;
* a pod deleted, or finished (``Succeeded`` / ``Failed``), releases its job; while it exists, the controller
  renews its job's lease unless the pod asked its worker to (``guardmesh.io/lease-ttl-s``);
* a job guardmesh preempts, or whose lease expired, evicts its pod through the Eviction API (so
  PodDisruptionBudgets are honoured) with a Kubernetes Event carrying the reason;
* a reservation whose pod never got it (the process stopped between reserving and annotating the pod) is
  released, so the pod's next scheduling attempt finds the room again.

It keeps no state of its own: after a restart the first pass rebuilds everything from the API server and
the scheduler's store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from guardmesh.config import ExtenderSettings
from guardmesh.errors import GuardmeshError
from guardmesh.inventory import GpuDevice, NodeSpec
from services.scheduler.extender import JOB_ANNOTATION, NODE_LABEL, Extender, pod_uid_of, serve_extender
from services.scheduler.jobs import HOLDS_ALLOCATION, JobState
from services.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

#: Node annotation with the node's GPUs: JSON list of {index, uuid, model, memory_mib, topology_group}.
GPUS_ANNOTATION = "guardmesh.io/gpus"
#: The component named in Events the controller records.
COMPONENT = "guardmesh-scheduler"
#: A reservation whose pod is still unscheduled and not annotated with it after this long is orphaned, s.
ORPHAN_GRACE_S = 60.0


class KubeApi:
    """The Kubernetes API calls of the extender and the controller, through the official client."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.core = client.CoreV1Api(api_client)

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Merge ``annotations`` into the pod's metadata (a JSON merge patch)."""
        self.core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": dict(annotations)}})

    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None:
        """Create the pod's Binding (``uid`` makes the API server refuse a recreated pod of the same name)."""
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace, uid=uid),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=node),
        )
        # The generated client cannot decode the answer (a Status, not a Binding): take it raw.
        self.core.create_namespaced_binding(namespace, body, _preload_content=False)

    def evict_pod(self, namespace: str, name: str) -> None:
        """Ask the Eviction API to evict the pod (it honours PodDisruptionBudgets)."""
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=namespace))
        self.core.create_namespaced_pod_eviction(name, namespace, body, _preload_content=False)

    def record_event(self, pod: PodFacts, reason: str, message: str) -> None:
        """A Warning Event on the pod."""
        now = datetime.now(tz=UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{pod.name}.{time.time_ns():x}", namespace=pod.namespace),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", name=pod.name, namespace=pod.namespace, uid=pod.uid
            ),
            reason=reason,
            message=message,
            type="Warning",
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        self.core.create_namespaced_event(pod.namespace, event)

    def list_pods(self) -> list[PodFacts]:
        """Every pod of the cluster."""
        return [PodFacts.of(p) for p in self.core.list_pod_for_all_namespaces().items]

    def list_nodes(self) -> list[client.V1Node]:
        """Every node of the cluster."""
        return list(self.core.list_node().items)


@dataclass(frozen=True)
class PodFacts:
    """What the controller reads of a pod (the client's fields are all optional; these are not)."""

    namespace: str
    name: str
    uid: str
    annotations: dict[str, str]
    node_name: str
    phase: str
    deleting: bool

    @classmethod
    def of(cls, pod: client.V1Pod) -> PodFacts:
        """Read a pod from the client's model."""
        meta = pod.metadata or client.V1ObjectMeta()
        return cls(
            namespace=meta.namespace or "",
            name=meta.name or "",
            uid=meta.uid or "",
            annotations=dict(meta.annotations or {}),
            node_name=(pod.spec.node_name if pod.spec is not None else None) or "",
            phase=(pod.status.phase if pod.status is not None else None) or "",
            deleting=meta.deletion_timestamp is not None,
        )

    @property
    def finished(self) -> bool:
        """The pod's containers ended for good."""
        return self.phase in ("Succeeded", "Failed")


def node_spec(node: client.V1Node, registered: NodeSpec | None) -> NodeSpec | None:
    """The guardmesh inventory of a Kubernetes node: its annotation, else what the agent registered.

    Raises ValueError naming the annotation when it is malformed. None when guardmesh knows no GPUs there.
    """
    meta = node.metadata or client.V1ObjectMeta()
    name = meta.name or ""
    raw = (meta.annotations or {}).get(GPUS_ANNOTATION)
    if raw is not None:
        try:
            items = json.loads(raw)
            gpus = tuple(
                GpuDevice(
                    index=int(g["index"]),
                    uuid=str(g["uuid"]),
                    model=str(g["model"]),
                    memory_mib=int(g["memory_mib"]),
                    topology_group=str(g.get("topology_group", "")),
                )
                for g in items
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                f"node {name}: annotation {GPUS_ANNOTATION} must be a JSON list of "
                f"{{index, uuid, model, memory_mib[, topology_group]}} ({exc})"
            ) from None
    elif registered is not None:
        gpus = registered.gpus
    else:
        return None
    labels = dict(registered.labels) if registered is not None else {}
    labels[NODE_LABEL] = name
    cpu = registered.cpu_milli if registered is not None else 0
    mem = registered.host_memory_mib if registered is not None else 0
    return NodeSpec(name, gpus, tuple(sorted(labels.items())), cpu, mem)


@dataclass
class Pass:
    """What one reconcile pass did (for logs and tests)."""

    registered: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _pod_gone(pod: PodFacts | None) -> bool:
    return pod is None or pod.finished


class Controller:
    """Level-triggered reconcile between the API server and the scheduler core (see the module docstring)."""

    def __init__(
        self,
        core: Scheduler,
        api: KubeApi,
        settings: ExtenderSettings | None = None,
        *,
        orphan_grace_s: float = ORPHAN_GRACE_S,
    ) -> None:
        self.core = core
        self.api = api
        self.settings = settings or ExtenderSettings()
        self.orphan_grace_s = orphan_grace_s
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Longest time between passes: the resync period, and a third of the lease the controller renews.
        self.period = min(self.settings.resync_s, core.settings.lease_ttl_s / 3)

    # -- one pass ----------------------------------------------------------------------------------------

    def reconcile(self) -> Pass:
        """Read the cluster and the core, and act on every difference; safe to repeat at any time."""
        done = Pass()
        self._nodes(done)
        self._pods(done)
        if done.released or done.evicted or done.registered:
            log.info(
                "reconciled", extra={"registered": done.registered, "released": done.released, "evicted": done.evicted}
            )
        return done

    def _nodes(self, done: Pass) -> None:
        with self.core.lock:
            known = {spec.name: spec for spec in self.core.state.nodes}
        changed = []
        for node in self.api.list_nodes():
            try:
                spec = node_spec(node, known.get((node.metadata or client.V1ObjectMeta()).name or ""))
                if spec is not None:
                    spec.validate()
            except (ValueError, GuardmeshError) as exc:
                done.errors.append(str(exc))
                continue
            if spec is not None and spec != known.get(spec.name):
                changed.append(spec)
        if changed:
            try:
                self.core.register_nodes(changed)
                done.registered.extend(s.name for s in changed)
            except GuardmeshError as exc:
                done.errors.append(f"registering {', '.join(s.name for s in changed)}: {exc}")

    def _pods(self, done: Pass) -> None:
        pods = {p.uid: p for p in self.api.list_pods()}
        now = self.core.clock()
        for job in self.core.list_jobs():
            uid = pod_uid_of(job.job_id)
            if uid is None:
                continue
            pod = pods.get(uid)
            try:
                gone = _pod_gone(pod) or self._orphaned(pod, now - job.updated_at)
                if job.state in HOLDS_ALLOCATION and gone:
                    self.core.release(job.job_id)
                    done.released.append(job.job_id)
                elif job.state == JobState.RUNNING and pod is not None and not job.spec.lease_ttl_s:
                    self.core.renew(job.job_id, 0)  # the pod exists: that is its liveness
                    done.renewed.append(job.job_id)
                elif job.state == JobState.PREEMPTING and pod is not None:
                    why = f"guardmesh preempted job {job.job_id} for guaranteed job {job.preempted_by}"
                    self._evict(pod, job.job_id, "Preempted", why, done)
                elif job.state == JobState.LEASE_EXPIRED and pod is not None and not pod.finished:
                    why = f"the lease of guardmesh job {job.job_id} expired: its worker stopped renewing it"
                    self._evict(pod, job.job_id, "LeaseExpired", why, done)
            except (GuardmeshError, ApiException) as exc:
                done.errors.append(f"job {job.job_id}: {exc}")

    def _orphaned(self, pod: PodFacts | None, age_s: float) -> bool:
        """A reservation its pod never got: the pod is still unscheduled long after the job was placed."""
        if pod is None or pod.node_name:
            return False
        # Bind reserves, then annotates, then binds: give a reservation in flight its time.
        return age_s > self.orphan_grace_s

    def _evict(self, pod: PodFacts, job_id: str, reason: str, message: str, done: Pass) -> None:
        if pod.deleting:
            return  # already going
        if pod.annotations.get(JOB_ANNOTATION) not in (None, job_id):
            return  # the pod holds a later reservation; this job is history
        # Evict first: a refused eviction (a PodDisruptionBudget answers 429) is retried next pass, and the
        # Event is recorded once the eviction was accepted.
        self.api.evict_pod(pod.namespace, pod.name)
        self.api.record_event(pod, reason, message)
        done.evicted.append(f"{pod.namespace}/{pod.name}")

    # -- running ---------------------------------------------------------------------------------------

    def start(self) -> Controller:
        """Reconcile on every pod or node event, every scheduler change, and every ``resync_s``."""
        for target in (self._loop, self._watch_pods):
            t = threading.Thread(target=target, name=f"kube-{target.__name__.strip('_')}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop the loops."""
        self._stop.set()
        self._kick.set()
        with self.core.changed:
            self.core.changed.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _loop(self) -> None:
        seen = -1
        last = 0.0

        def woken() -> bool:
            return self._stop.is_set() or self._kick.is_set() or self.core.event_seq != seen

        while not self._stop.is_set():
            with self.core.changed:
                self.core.changed.wait_for(woken, timeout=min(1.0, self.period))
            if self._stop.is_set():
                return
            due = time.monotonic() - last >= self.period
            if not (due or self._kick.is_set() or self.core.event_seq != seen):
                continue
            self._kick.clear()
            seen = self.core.event_seq
            last = time.monotonic()
            try:
                self.reconcile()
            except Exception:  # the API server is away: the next pass tries again
                log.exception("reconcile failed")

    def _watch_pods(self) -> None:
        while not self._stop.is_set():
            try:
                # The watch ends after a resync period (the server's timeout, or the client's read timeout if
                # the server ignores it), so stop() never waits longer than that.
                timeout = max(1, int(self.settings.resync_s))
                stream = watch.Watch().stream(
                    self.api.core.list_pod_for_all_namespaces, timeout_seconds=timeout, _request_timeout=timeout
                )
                for _ in stream:
                    self._kick.set()
                    with self.core.changed:
                        self.core.changed.notify_all()
                    if self._stop.is_set():
                        return
            except Exception as exc:  # a broken watch: back off, the periodic pass still runs
                log.debug("pod watch ended", extra={"error": str(exc)})
                self._stop.wait(1.0)


class KubernetesSide:
    """The extender endpoint and the controller of one scheduler process, following its leadership: the
    endpoint listens on every replica (a standby answers that it stands by and reports NOT_SERVING, so the
    Service routes to the leader); the controller runs only beside the leading core."""

    def __init__(self, settings: ExtenderSettings, api: KubeApi | None = None) -> None:
        self.settings = settings
        self.api = api or in_cluster_api()
        self._core: Scheduler | None = None
        self.extender = Extender(lambda: self._core, self.api, settings)
        self.http = serve_extender(self.extender)
        self.controller: Controller | None = None

    def lead(self, core: Scheduler) -> None:
        """This replica leads with ``core``: answer with it and reconcile it."""
        self.stand_by()
        self._core = core
        if self.settings.controller:
            self.controller = Controller(core, self.api, self.settings).start()

    def stand_by(self) -> None:
        """This replica stands by: refuse verbs, stop reconciling."""
        self._core = None
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def close(self) -> None:
        """Stop everything."""
        self.stand_by()
        self.http.stop()


def in_cluster_api() -> KubeApi:
    """The API client from the pod's service account (or ``~/.kube/config`` outside a cluster)."""
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
    return KubeApi(client.ApiClient())
