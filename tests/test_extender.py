"""The scheduler extender's wire format over real HTTP, in exactly the documents kube-scheduler sends.

The request and response documents follow ``k8s.io/kube-scheduler/extender/v1`` (types.go) and its
``TestCompatibility`` fixtures: Go field names with no JSON tags (so ``Nodes``/``NodeNames`` are ``null``
when unused and every field is present), a Pod and Nodes as the API server serialises them
(``creationTimestamp: null``, ``status: {}``), scores 0..10, and keys decoded case-insensitively.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from guardmesh.config import ExtenderSettings, SchedulerSettings
from guardmesh.inventory import uniform_node
from services.scheduler.extender import NODE_LABEL, BadRequest, Extender, ExtenderHttpServer, job_id_of
from services.scheduler.jobs import JobSpec, JobState
from services.scheduler.placement import ReplicaShape, pending_reason
from services.scheduler.scheduler import Scheduler

RESOURCE = "guardmesh.io/gpu-memory-mib"
FILTER_KEYS = {"Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"}


def k8s_pod(name: str, uid: str, mib: int | None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A v1.Pod as kube-scheduler serialises it into ExtenderArgs.Pod."""
    resources: dict[str, Any] = {"limits": {"cpu": "1"}, "requests": {"cpu": "1"}}
    if mib is not None:
        resources["limits"][RESOURCE] = str(mib)
        resources["requests"][RESOURCE] = str(mib)
    return {
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "uid": uid,
            "creationTimestamp": None,
            "annotations": annotations or {},
        },
        "spec": {"containers": [{"name": "train", "image": "trainer:1", "resources": resources}], "priority": 0},
        "status": {},
    }


def k8s_node(name: str) -> dict[str, Any]:
    """A v1.Node as in the TestCompatibility fixture of ExtenderArgs.Nodes."""
    return {
        "metadata": {"name": name, "creationTimestamp": None},
        "spec": {},
        "status": {
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": "",
                "osImage": "",
                "containerRuntimeVersion": "",
                "kubeletVersion": "",
                "kubeProxyVersion": "",
                "operatingSystem": "",
                "architecture": "",
            },
        },
    }


class RecordingApi:
    """Collects bind's Kubernetes calls (the lifecycle tests use the real client; here only the wire)."""

    def __init__(self) -> None:
        self.annotations: dict[tuple[str, str], dict[str, str]] = {}
        self.bindings: list[tuple[str, str, str, str]] = []

    def annotate_pod(self, namespace: str, name: str, annotations: Any) -> None:
        self.annotations[(namespace, name)] = dict(annotations)

    def bind_pod(self, namespace: str, name: str, uid: str, node: str) -> None:
        self.bindings.append((namespace, name, uid, node))


@pytest.fixture
def core() -> Scheduler:
    """A scheduler core with three labelled nodes: two 2 x 40 GiB, one 1 x 16 GiB."""
    sched = Scheduler(SchedulerSettings(gpu_reserve_mib=0), policy="best-fit")
    sched.register_nodes(
        [
            uniform_node("big-a", "A100", 2, 40960, labels={NODE_LABEL: "big-a"}),
            uniform_node("big-b", "A100", 2, 40960, labels={NODE_LABEL: "big-b"}),
            uniform_node("small", "T4", 1, 16384, labels={NODE_LABEL: "small"}),
        ]
    )
    return sched


@pytest.fixture
def served(core: Scheduler) -> Iterator[tuple[str, Extender, RecordingApi]]:
    """The extender over real HTTP on an ephemeral port."""
    api = RecordingApi()
    # A gang's members, bound from threads started together, may arrive seconds apart on a loaded machine.
    ext = Extender(core, api, ExtenderSettings(port=0, gang_wait_s=60.0))
    server = ExtenderHttpServer(ext, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{server.port}", ext, api
    server.stop()


def post(base: str, verb: str, body: Any, *, raw: bytes | None = None) -> tuple[int, Any, str]:
    """POST a document as kube-scheduler does; (status, decoded JSON, raw text)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/{verb}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text), text
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        return err.code, json.loads(text), text


def snapshot(core: Scheduler) -> tuple[Any, ...]:
    """Everything a bad request must leave unchanged."""
    with core.lock:
        return (
            {j: (job.state, dict(job.placements)) for j, job in core.jobs.items()},
            core.state.gpu_avail.copy().tolist(),
            core.event_seq,
        )


def test_filter_with_node_names_answers_every_field_in_kube_schedulers_shape(served: Any) -> None:
    base, _, _ = served
    args = {"Pod": k8s_pod("p1", "uid-1", 20000), "Nodes": None, "NodeNames": ["big-a", "small", "cpu-only"]}
    status, doc, _ = post(base, "filter", args)
    assert status == 200
    assert set(doc) == FILTER_KEYS
    assert doc["Nodes"] is None  # nodeCacheCapable: names only
    assert doc["NodeNames"] == ["big-a"]
    assert doc["FailedNodes"] == {}
    assert set(doc["FailedAndUnresolvableNodes"]) == {"small", "cpu-only"}
    assert "16384" not in doc["FailedAndUnresolvableNodes"]["small"]
    assert "could ever hold 1 shareable GPU with >= 20000 MiB" in doc["FailedAndUnresolvableNodes"]["small"]
    assert "no GPUs registered with guardmesh" in doc["FailedAndUnresolvableNodes"]["cpu-only"]
    assert doc["Error"] == ""


def test_filter_with_node_objects_returns_the_passing_node_objects_unchanged(served: Any) -> None:
    base, _, _ = served
    nodes = {"metadata": {}, "items": [k8s_node("big-a"), k8s_node("small")]}
    status, doc, _ = post(base, "filter", {"Pod": k8s_pod("p1", "uid-1", 20000), "Nodes": nodes, "NodeNames": None})
    assert status == 200
    assert doc["NodeNames"] is None
    assert doc["Nodes"] == {"metadata": {}, "items": [k8s_node("big-a")]}
    assert list(doc["FailedAndUnresolvableNodes"]) == ["small"]


def test_keys_are_decoded_case_insensitively_as_go_does(served: Any) -> None:
    base, _, _ = served
    # TestCompatibility round-trips every document lower-cased: kube-scheduler's decoder accepts both.
    args = json.loads(json.dumps({"Pod": k8s_pod("p1", "uid-1", 20000), "NodeNames": ["big-a"]}).lower())
    args["pod"]["spec"]["containers"][0]["resources"]["limits"] = {RESOURCE: "20000"}
    status, doc, _ = post(base, "filter", args)
    assert (status, doc["NodeNames"], doc["Error"]) == (200, ["big-a"], "")


def test_a_full_node_fails_with_the_reason_pending_reason_gives(served: Any, core: Scheduler) -> None:
    base, _, _ = served
    core.submit(
        JobSpec(
            "fill-a", "t", 1, 2, memory_mib_per_gpu=40960, allow_sharing=True, node_selector=((NODE_LABEL, "big-a"),)
        )
    )
    status, doc, _ = post(base, "filter", {"Pod": k8s_pod("p1", "uid-1", 20000), "NodeNames": ["big-a", "big-b"]})
    assert status == 200 and doc["NodeNames"] == ["big-b"]
    reason = doc["FailedNodes"]["big-a"]
    shape = ReplicaShape.of(JobSpec("x", "t", 1, 1, memory_mib_per_gpu=20000, allow_sharing=True))
    # The same need, in the same words, as the gRPC service's pending_reason.
    assert shape.describe_need() in pending_reason(core.state, shape)
    assert reason == f"node has 0 of the {shape.describe_need()} needed"


def test_prioritize_maps_the_policy_score_onto_0_to_10(served: Any, core: Scheduler) -> None:
    base, _, _ = served
    # best-fit: the node left with the least room wins. Rooms after an 8000 MiB pod, in thousandths of a
    # card: small 1000 - 488 = 512, big-a (holding 30000 MiB) 2000 - 732 - 195 = 1073, big-b 2000 - 195 = 1805.
    core.submit(
        JobSpec(
            "part-a", "t", 1, 1, memory_mib_per_gpu=30000, allow_sharing=True, node_selector=((NODE_LABEL, "big-a"),)
        )
    )
    status, doc, _ = post(
        base, "prioritize", {"Pod": k8s_pod("p1", "uid-1", 8000), "NodeNames": ["big-b", "big-a", "small"]}
    )
    assert status == 200
    # Linear from the best (10) to the worst (0): big-a at 10 * (1805 - 1073) / (1805 - 512) = 5.7 -> 6.
    assert doc == [{"Host": "big-b", "Score": 0}, {"Host": "big-a", "Score": 6}, {"Host": "small", "Score": 10}]
    assert all(set(hp) == {"Host", "Score"} and isinstance(hp["Score"], int) and 0 <= hp["Score"] <= 10 for hp in doc)


def test_prioritize_gives_0_to_nodes_that_cannot_take_the_pod(served: Any) -> None:
    base, _, _ = served
    status, doc, _ = post(
        base, "prioritize", {"Pod": k8s_pod("p1", "uid-1", 20000), "NodeNames": ["small", "big-a", "ghost"]}
    )
    assert status == 200
    assert doc == [{"Host": "small", "Score": 0}, {"Host": "big-a", "Score": 10}, {"Host": "ghost", "Score": 0}]


def test_bind_reserves_pins_to_the_node_and_publishes_caps_and_env(served: Any, core: Scheduler) -> None:
    base, _, api = served
    post(base, "filter", {"Pod": k8s_pod("p1", "uid-1", 20000), "NodeNames": ["big-a", "big-b"]})
    args = {"PodName": "p1", "PodNamespace": "team-a", "PodUID": "uid-1", "Node": "big-b"}
    status, doc, _ = post(base, "bind", args)
    assert (status, doc) == (200, {"Error": ""})
    job = core.describe(job_id_of("uid-1"))
    assert job.state == JobState.RUNNING and job.placements[0].node == "big-b"
    assert api.bindings == [("team-a", "p1", "uid-1", "big-b")]
    notes = api.annotations[("team-a", "p1")]
    uuid = job.placements[0].gpus[0].uuid
    assert notes["guardmesh.io/gpu-uuids"] == uuid
    assert notes["guardmesh.io/gpu-memory-cap-mib"] == "20000"
    env = json.loads(notes["guardmesh.io/env"])
    assert env["CUDA_VISIBLE_DEVICES"] == uuid and env["GUARDMESH_GPU_MEMORY_CAP_MIB"] == "20000"
    # A retried bind (kube-scheduler timed out waiting) finds the same reservation: nothing doubles.
    assert post(base, "bind", args)[1] == {"Error": ""}
    assert [j.job_id for j in core.list_jobs() if j.state == JobState.RUNNING] == [job_id_of("uid-1")]


def test_cpu_only_pod_passes_through_every_node(served: Any, core: Scheduler) -> None:
    base, _, api = served
    before = snapshot(core)
    status, doc, _ = post(base, "filter", {"Pod": k8s_pod("web", "uid-web", None), "NodeNames": ["small", "cpu-only"]})
    assert (status, doc["NodeNames"], doc["FailedNodes"], doc["Error"]) == (200, ["small", "cpu-only"], {}, "")
    assert snapshot(core) == before
    # A bind for it (kube-scheduler binds such pods itself) is refused, saying why; nothing changes.
    args = {"PodName": "web", "PodNamespace": "team-a", "PodUID": "uid-web", "Node": "small"}
    status, doc, _ = post(base, "bind", args)
    assert status == 200 and "asks for no guardmesh.io/gpu-memory-mib: guardmesh has nothing to reserve" in doc["Error"]
    assert snapshot(core) == before and api.bindings == []


@pytest.mark.parametrize(
    ("verb", "body", "expect"),
    [
        ("filter", b"{not json", "request body is not valid JSON"),
        ("bind", b"[1, 2", "request body is not valid JSON"),
        ("preempt", b"\xff\xfe", "request body is not valid JSON"),
        ("filter", json.dumps({"Pod": k8s_pod("p", "u", 100)}).encode(), "set NodeNames"),
        (
            "filter",
            json.dumps({"Pod": k8s_pod("p", "u", None, {"guardmesh.io/gpus": "2"}), "NodeNames": ["big-a"]}).encode(),
            "asks for no guardmesh.io/gpu-memory-mib",
        ),
        (
            "filter",
            json.dumps({"Pod": k8s_pod("p", "u", 100, {"guardmesh.io/qos": "gold"}), "NodeNames": ["big-a"]}).encode(),
            "guardmesh.io/qos]: must be one of guaranteed, burstable, best-effort",
        ),
        (
            "filter",
            json.dumps({"Pod": k8s_pod("p", "u", "lots"), "NodeNames": ["big-a"]}).encode(),  # type: ignore[arg-type]
            "must be a whole number of MiB",
        ),
        (
            "bind",
            json.dumps({"PodName": "never", "PodNamespace": "team-a", "PodUID": "uid-x", "Node": "big-a"}).encode(),
            "was never filtered by this extender",
        ),
        ("bind", json.dumps({"PodName": "p1", "PodNamespace": "team-a", "Node": "big-a"}).encode(), "PodUID: must be"),
    ],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(
    served: Any, core: Scheduler, verb: str, body: bytes, expect: str
) -> None:
    base, _, api = served
    before = snapshot(core)
    status, doc, text = post(base, verb, None, raw=body)
    assert status == 200
    assert expect in doc["Error"]
    assert "Traceback" not in text
    assert snapshot(core) == before and api.bindings == []


def test_bind_to_an_unknown_node_is_refused(served: Any, core: Scheduler) -> None:
    base, _, api = served
    post(base, "filter", {"Pod": k8s_pod("p1", "uid-1", 20000), "NodeNames": ["big-a"]})
    before = snapshot(core)
    status, doc, _ = post(base, "bind", {"PodName": "p1", "PodNamespace": "team-a", "PodUID": "uid-1", "Node": "ghost"})
    assert status == 200 and "node 'ghost' has no GPUs registered with guardmesh" in doc["Error"]
    assert snapshot(core) == before and api.bindings == []


def test_bind_refuses_a_node_that_filled_up_since_filter(served: Any, core: Scheduler) -> None:
    base, _, api = served
    post(base, "filter", {"Pod": k8s_pod("p1", "uid-1", 20000), "NodeNames": ["small"]})
    status, doc, _ = post(base, "bind", {"PodName": "p1", "PodNamespace": "team-a", "PodUID": "uid-1", "Node": "small"})
    assert status == 200 and "no longer fits on small" in doc["Error"]
    assert api.bindings == [] and job_id_of("uid-1") not in core.jobs


def test_prioritize_bad_input_is_a_400_with_a_json_error(served: Any) -> None:
    base, _, _ = served
    status, doc, text = post(base, "prioritize", None, raw=b"{")
    assert status == 400 and "not valid JSON" in doc["Error"] and "Traceback" not in text
    status, doc, _ = post(base, "nonsense", {})
    assert status == 404 and "unknown verb" in doc["Error"]


def bind_pod(base: str, name: str, uid: str, mib: int, node: str, annotations: dict[str, str] | None = None) -> str:
    """filter then bind one pod; the bind's Error."""
    post(base, "filter", {"Pod": k8s_pod(name, uid, mib, annotations), "NodeNames": [node]})
    return str(post(base, "bind", {"PodName": name, "PodNamespace": "team-a", "PodUID": uid, "Node": node})[1]["Error"])


def test_preempt_keeps_the_fewest_guardmesh_victims_and_other_victims_as_proposed(served: Any, core: Scheduler) -> None:
    base, _, _ = served
    # big-a: card 0 holds 10 GiB + 10 GiB pods, card 1 one 35 GiB pod. A 30 GiB pod needs one victim: the 35.
    assert bind_pod(base, "s1", "uid-s1", 10240, "big-a") == ""
    assert bind_pod(base, "s2", "uid-s2", 10240, "big-a") == ""
    assert bind_pod(base, "l1", "uid-l1", 35000, "big-a") == ""
    with core.lock:
        cards = {j: core.jobs[job_id_of(j)].placements[0].gpus[0].index for j in ("uid-s1", "uid-s2", "uid-l1")}
    assert cards["uid-s1"] == cards["uid-s2"] != cards["uid-l1"]
    post(base, "filter", {"Pod": k8s_pod("p", "uid-p", 38000), "NodeNames": ["big-a"]})
    before = snapshot(core)
    victims = {
        "Pods": [{"UID": "uid-s1"}, {"UID": "uid-s2"}, {"UID": "uid-l1"}, {"UID": "uid-cpu"}],
        "NumPDBViolations": 1,
    }
    args = {
        "Pod": k8s_pod("p", "uid-p", 38000),
        "NodeNameToVictims": None,
        "NodeNameToMetaVictims": {"big-a": victims, "ghost": victims},
    }
    status, doc, _ = post(base, "preempt", args)
    assert status == 200
    assert doc == {
        "NodeNameToMetaVictims": {"big-a": {"Pods": [{"UID": "uid-cpu"}, {"UID": "uid-l1"}], "NumPDBViolations": 1}}
    }
    assert snapshot(core) == before  # the search is simulated: nobody's cards moved


def test_preempt_with_full_victim_pods_when_not_node_cache_capable(served: Any, core: Scheduler) -> None:
    base, _, _ = served
    assert bind_pod(base, "l1", "uid-l1", 40960, "big-b") == ""
    assert bind_pod(base, "l2", "uid-l2", 40960, "big-b") == ""
    victims = {"Pods": [k8s_pod("l1", "uid-l1", 40960), k8s_pod("l2", "uid-l2", 40960)], "NumPDBViolations": 0}
    # Two cards needed, both full: both victims; a node where no subset helps is dropped.
    pod = k8s_pod("p", "uid-p", 40000, {"guardmesh.io/gpus": "2"})
    status, doc, _ = post(
        base,
        "preempt",
        {"Pod": pod, "NodeNameToVictims": {"big-b": victims, "small": {"Pods": [], "NumPDBViolations": 0}}},
    )
    assert status == 200
    assert doc == {
        "NodeNameToMetaVictims": {"big-b": {"Pods": [{"UID": "uid-l1"}, {"UID": "uid-l2"}], "NumPDBViolations": 0}}
    }


def test_gang_binds_all_together_or_none(served: Any, core: Scheduler) -> None:
    base, ext, api = served
    group = {"guardmesh.io/pod-group": "g", "guardmesh.io/pod-group-size": "3"}
    pods = [("m0", "uid-m0", "big-a"), ("m1", "uid-m1", "big-a"), ("m2", "uid-m2", "big-b")]
    for name, uid, node in pods:
        post(base, "filter", {"Pod": k8s_pod(name, uid, 40000, dict(group)), "NodeNames": [node]})
    errors: dict[str, str] = {}

    def bind(name: str, uid: str, node: str) -> None:
        doc = post(base, "bind", {"PodName": name, "PodNamespace": "team-a", "PodUID": uid, "Node": node})[1]
        errors[name] = doc["Error"]

    threads = [threading.Thread(target=bind, args=p) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == {"m0": "", "m1": "", "m2": ""}
    assert sorted(b[1] for b in api.bindings) == ["m0", "m1", "m2"]
    assert all(core.describe(job_id_of(uid)).state == JobState.RUNNING for _, uid, _ in pods)
    assert (ext._groups, ext._outcomes, ext._binding) == ({}, {}, set())  # nothing left behind


def test_tls_endpoint_with_client_certificates(core: Scheduler, tmp_path: Any) -> None:
    import ssl

    from guardmesh.certs import generate
    from services.scheduler.extender import tls_context

    generate(tmp_path, ["scheduler"])
    settings = ExtenderSettings(
        port=0,
        cert_file=str(tmp_path / "scheduler.pem"),
        key_file=str(tmp_path / "scheduler-key.pem"),
        client_ca_file=str(tmp_path / "ca.pem"),
    )
    server = ExtenderHttpServer(Extender(core, RecordingApi(), settings), "127.0.0.1", 0, tls_context(settings)).start()
    try:
        url = f"https://localhost:{server.port}/filter"
        body = json.dumps({"Pod": k8s_pod("p1", "uid-1", 20000), "NodeNames": ["big-a"]}).encode()
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ctx.load_cert_chain(str(tmp_path / "client-admin.pem"), str(tmp_path / "client-admin-key.pem"))
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30, context=ctx) as resp:
            assert json.loads(resp.read())["NodeNames"] == ["big-a"]
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))  # no client certificate
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30, context=anonymous).read()
    finally:
        server.stop()
    with pytest.raises(ValueError, match="set both or neither"):
        tls_context(ExtenderSettings(cert_file=str(tmp_path / "scheduler.pem")))


# The JSON documents of kube-scheduler's own compatibility test (extender/v1 types_test.go, TestCompatibility).
FIXTURE_PREEMPTION_ARGS = (
    '{"Pod":{"metadata":{"name":"podname","creationTimestamp":null},"spec":{"containers":null},"status":{}},'
    '"NodeNameToVictims":{"foo":{"Pods":[{"metadata":{"name":"podname","creationTimestamp":null},'
    '"spec":{"containers":null},"status":{}}],"NumPDBViolations":1}},'
    '"NodeNameToMetaVictims":{"foo":{"Pods":[{"UID":"myuid"}],"NumPDBViolations":1}}}'
)
FIXTURE_PREEMPTION_RESULT = '{"NodeNameToMetaVictims":{"foo":{"Pods":[{"UID":"myuid"}],"NumPDBViolations":1}}}'
FIXTURE_ARGS = (
    '{"Pod":{"metadata":{"name":"podname","creationTimestamp":null},"spec":{"containers":null},"status":{}},'
    '"Nodes":{"metadata":{},"items":[{"metadata":{"name":"nodename","creationTimestamp":null},"spec":{},'
    '"status":{"daemonEndpoints":{"kubeletEndpoint":{"Port":0}},"nodeInfo":{"machineID":"","systemUUID":"",'
    '"bootID":"","kernelVersion":"","osImage":"","containerRuntimeVersion":"","kubeletVersion":"",'
    '"kubeProxyVersion":"","operatingSystem":"","architecture":""}}}]},"NodeNames":["node1"]}'
)
FIXTURE_BINDING_ARGS = '{"PodName":"mypodname","PodNamespace":"mypodnamespace","PodUID":"mypoduid","Node":"mynode"}'


@pytest.mark.parametrize("lower", [False, True])
def test_kube_schedulers_own_fixtures_decode_and_answer_in_its_shape(served: Any, lower: bool) -> None:
    base, _, _ = served

    def send(verb: str, doc: str) -> Any:
        return post(base, verb, None, raw=(doc.lower() if lower else doc).encode())

    # The fixture pod asks for no GPU memory: preempt passes kube-scheduler's victims through unchanged,
    # which is exactly the fixture's ExtenderPreemptionResult.
    # Whatever the case of the keys sent, the answer uses Go's field names.
    status, doc, _ = send("preempt", FIXTURE_PREEMPTION_ARGS)
    assert status == 200 and doc == json.loads(FIXTURE_PREEMPTION_RESULT)
    # filter: Node objects in, the same Node objects out (a CPU-only pod passes every node).
    status, doc, _ = send("filter", FIXTURE_ARGS)
    nodes = json.loads(FIXTURE_ARGS if not lower else FIXTURE_ARGS.lower())[("Nodes" if not lower else "nodes")]
    assert status == 200 and doc == {
        "Nodes": nodes,
        "NodeNames": None,
        "FailedNodes": {},
        "FailedAndUnresolvableNodes": {},
        "Error": "",
    }
    status, doc, _ = send("bind", FIXTURE_BINDING_ARGS)
    assert status == 200 and set(doc) == {"Error"} and "was never filtered by this extender" in doc["Error"]
    status, doc, _ = send("prioritize", FIXTURE_ARGS)
    assert (status, doc) == (200, [{"Host": "nodename", "Score": 0}])


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _or_any(valid: Any) -> Any:
    """A strategy giving a valid value or any JSON in its place."""
    return st.one_of(st.just(valid) if not isinstance(valid, st.SearchStrategy) else valid, _json)


_annotations = st.dictionaries(
    st.sampled_from(
        [
            f"guardmesh.io/{k}"
            for k in ("gpus", "qos", "sharing", "topology", "pod-group", "pod-group-size", "gpu-models", "lease-ttl-s")
        ]
    ),
    _or_any(st.sampled_from(["1", "2", "true", "required", "guaranteed", "g", "0"])),
    max_size=3,
)
_pod = st.fixed_dictionaries(
    {
        "metadata": _or_any(
            st.fixed_dictionaries(
                {
                    "name": _or_any("p"),
                    "namespace": _or_any("team-a"),
                    "uid": _or_any("uid-1"),
                    "annotations": _or_any(_annotations),
                }
            )
        ),
        "spec": _or_any(
            st.fixed_dictionaries(
                {
                    "priority": _json,
                    "containers": _or_any(
                        st.lists(
                            st.fixed_dictionaries(
                                {
                                    "resources": _or_any(
                                        st.fixed_dictionaries(
                                            {
                                                "limits": _or_any(st.fixed_dictionaries({RESOURCE: _or_any("20000")})),
                                            }
                                        )
                                    ),
                                }
                            ),
                            max_size=2,
                        )
                    ),
                }
            )
        ),
    }
)
_victims = st.dictionaries(
    st.sampled_from(["big-a", "small", "ghost"]),
    _or_any(
        st.fixed_dictionaries(
            {
                "Pods": _or_any(st.lists(_or_any(st.fixed_dictionaries({"UID": _or_any("uid-1")})), max_size=2)),
                "NumPDBViolations": _json,
            }
        )
    ),
    max_size=2,
)
# Documents in the protocol's shapes with any JSON at any place, so that every branch of the parser is reached.
_documents = st.one_of(
    st.fixed_dictionaries(
        {
            "Pod": _or_any(_pod),
            "NodeNames": _or_any(["big-a", "small", "ghost"]),
            "Nodes": _or_any(st.fixed_dictionaries({"items": _or_any(st.lists(_json, max_size=2))})),
        }
    ),
    st.fixed_dictionaries(
        {"Pod": _or_any(_pod), "NodeNameToMetaVictims": _or_any(_victims), "NodeNameToVictims": _or_any(_victims)}
    ),
    st.fixed_dictionaries(
        {
            "PodName": _or_any("p"),
            "PodNamespace": _or_any("team-a"),
            "PodUID": _or_any("uid-1"),
            "Node": _or_any("big-a"),
        }
    ),
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_json, _documents))
def test_any_json_document_gets_an_answer_never_an_exception(core: Scheduler, doc: Any) -> None:
    ext = Extender(core, RecordingApi(), ExtenderSettings(gang_wait_s=0.01))
    before = snapshot(core)
    for verb in (ext.filter, ext.bind, ext.preempt):
        answer = verb(doc)
        assert isinstance(answer, dict)
    with contextlib.suppress(BadRequest):  # the HTTP layer answers it with 400 and a JSON error
        ext.prioritize(doc)
    assert snapshot(core) == before
