"""deploy/: every overlay rendered by kustomize (``kubectl kustomize``, offline) and every rendered object
validated against the Kubernetes OpenAPI schemas by kubernetes-validate; then the properties the issue asks
for, read from the rendered objects (probes, resources, PDBs, scrape annotations, least-privilege RBAC, the
extender stanza, a mesh config the services accept)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from guardmesh.config import load_config

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = ["base", "overlays/dev", "overlays/production"]
#: The Kubernetes version the schemas are checked against (kubernetes-validate's newest).
K8S_VERSION = "1.37.0"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
GRPC_SERVICES = {"scheduler": 50061, "paramserver": 50062, "scorer": 50063, "abrouter": 50064}


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects kustomize renders for ``overlay``."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl (with its built-in kustomize) is needed to render deploy/"
    out = subprocess.run(
        [kubectl, "kustomize", str(REPO / "deploy" / overlay)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def of_kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    """Rendered objects of one kind."""
    return [d for d in rendered(overlay) if d["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> dict[str, Any]:
    """One rendered object."""
    (obj,) = [d for d in of_kind(overlay, kind) if d["metadata"]["name"] == name]
    return obj


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_openapi_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    assert len(docs) > 20
    for doc in docs:
        # strict: unknown fields are errors too (a misspelt key would otherwise be dropped silently).
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    deployment = named("base", "Deployment", "scorer")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_grpc_service_has_grpc_probes_resources_scrape_annotations_and_a_pdb(overlay: str) -> None:
    workloads = {d["metadata"]["name"]: d for d in rendered(overlay) if d["kind"] in WORKLOADS}
    pdbs = of_kind(overlay, "PodDisruptionBudget")
    for name, port in GRPC_SERVICES.items():
        workload = workloads[name]
        template = workload["spec"]["template"]
        (container,) = template["spec"]["containers"]
        assert container["args"] == ["serve", name]
        assert container["readinessProbe"]["grpc"]["port"] == port
        assert container["livenessProbe"]["grpc"]["port"] == port
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
        notes = template["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) in {p["containerPort"] for p in container["ports"]}
        labels = template["metadata"]["labels"]
        covering = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
    assert workloads["scheduler"]["kind"] == workloads["paramserver"]["kind"] == "StatefulSet"
    assert workloads["scorer"]["kind"] == workloads["abrouter"]["kind"] == "Deployment"
    assert workloads["agent"]["kind"] == "DaemonSet"
    for stateful in ("scheduler", "paramserver"):
        assert workloads[stateful]["spec"]["volumeClaimTemplates"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_route_to_the_workloads_ports(overlay: str) -> None:
    services = {s["metadata"]["name"]: s for s in of_kind(overlay, "Service")}
    for name, port in GRPC_SERVICES.items():
        svc = services[f"guardmesh-{name}"]
        assert port in [p["port"] for p in svc["spec"]["ports"]]
        assert svc["spec"]["selector"] == {"app.kubernetes.io/name": f"guardmesh-{name}"}
    assert 8888 in [p["port"] for p in services["guardmesh-scheduler"]["spec"]["ports"]]


def test_the_scheduler_role_is_least_privilege() -> None:
    role = named("base", "ClusterRole", "guardmesh-scheduler")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    expected = {("", "pods", v) for v in ("get", "list", "watch", "patch")}
    expected |= {("", "pods/binding", "create"), ("", "pods/eviction", "create")}
    expected |= {("", "nodes", v) for v in ("get", "list", "watch")}
    expected |= {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    assert granted == expected
    for obj in rendered("base"):
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], obj["metadata"]["name"]
    # Only the scheduler's service account mounts an API token among guardmesh's own pods.
    assert named("base", "ServiceAccount", "guardmesh-workload")["automountServiceAccountToken"] is False


def test_kube_scheduler_profile_has_the_extender_stanza() -> None:
    config_map = [
        c for c in of_kind("base", "ConfigMap") if c["metadata"]["name"].startswith("guardmesh-kube-scheduler-config")
    ]
    (cm,) = config_map
    config = yaml.safe_load(cm["data"]["kube-scheduler-config.yaml"])
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1" and config["kind"] == "KubeSchedulerConfiguration"
    assert [p["schedulerName"] for p in config["profiles"]] == ["guardmesh"]
    (ext,) = config["extenders"]
    mesh = load_config(REPO / "deploy" / "base" / "mesh.toml", env={})
    assert ext["urlPrefix"] == f"http://guardmesh-scheduler.guardmesh.svc:{mesh.extender.port}"
    assert (ext["filterVerb"], ext["prioritizeVerb"], ext["bindVerb"], ext["preemptVerb"]) == (
        "filter",
        "prioritize",
        "bind",
        "preempt",
    )
    assert ext["managedResources"] == [{"name": mesh.extender.resource_name, "ignoredByScheduler": True}]
    assert ext["nodeCacheCapable"] is True
    # A gang member waits in bind up to gang_wait_s: kube-scheduler must wait longer than that.
    assert float(ext["httpTimeout"].rstrip("s")) > mesh.extender.gang_wait_s
    deployment = named("base", "Deployment", "kube-scheduler")
    mount = deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert mount == cm["metadata"]["name"]  # the hashed name kustomize gave the generated ConfigMap


@pytest.mark.parametrize(("overlay", "shards"), [("base", 2), ("overlays/dev", 1), ("overlays/production", 4)])
def test_the_mesh_config_is_valid_and_shards_match_the_statefulset(overlay: str, shards: int) -> None:
    maps = {c["metadata"]["name"].rsplit("-", 1)[0]: c for c in of_kind(overlay, "ConfigMap")}
    env = maps["guardmesh-env"]["data"]
    text = maps["guardmesh-config"]["data"]["mesh.toml"]
    tomllib.loads(text)
    path = REPO / "deploy" / "base" / "mesh.toml"
    assert path.read_text() == text
    config = load_config(path, env=env)  # what a container sees: the file plus guardmesh-env
    assert config.extender.enabled and config.paramserver.shards == shards
    assert named(overlay, "StatefulSet", "paramserver")["spec"]["replicas"] == shards
    for name, port in GRPC_SERVICES.items():
        assert config.services[name].port == port and config.services[name].host == f"guardmesh-{name}"


def test_docker_compose_keeps_state_publishes_metrics_checks_health_and_restarts() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    config = load_config(env={})
    for name in GRPC_SERVICES:
        entry = compose["services"][name]
        metrics = config.services[name].metrics_port
        assert (
            f"{metrics}:{metrics}" in entry["ports"] and entry["environment"]["GUARDMESH__METRICS__HOST"] == "0.0.0.0"
        )
        probe = " ".join(entry["healthcheck"]["test"])
        assert f"health_status('127.0.0.1:{config.services[name].port}', '{name}')" in probe
        assert entry["restart"] == "unless-stopped"
        (volume,) = entry["volumes"]
        source, target = volume.split(":")
        assert target == "/var/lib/guardmesh" and source in compose["volumes"]  # a named volume, not a bind
    assert {"scheduler-state", "scorer-state"} <= set(compose["volumes"])


def test_dockerignore_keeps_the_venv_and_the_mesh_state_out_of_the_image() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    assert {".venv", ".mesh", "**/.mesh", "certs"} <= ignored


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_on_a_read_write_once_claim_run_one_pod_and_recreate(overlay: str) -> None:
    claims = {c["metadata"]["name"]: c for c in of_kind(overlay, "PersistentVolumeClaim")}
    on_claims = 0
    for deployment in of_kind(overlay, "Deployment"):
        volumes = deployment["spec"]["template"]["spec"].get("volumes", [])
        names = [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
        if any(claims[n]["spec"]["accessModes"] == ["ReadWriteOnce"] for n in names):
            on_claims += 1
            # Two pods cannot mount it on different nodes: a rolling update would wait forever.
            assert deployment["spec"]["replicas"] == 1, deployment["metadata"]["name"]
            assert deployment["spec"]["strategy"]["type"] == "Recreate", deployment["metadata"]["name"]
    assert on_claims == 2  # the scorer's and the abrouter's state
