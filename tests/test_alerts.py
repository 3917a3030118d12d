"""The alerting rules and the dashboard: promtool checks and unit-tests the rules (deploy/prometheus), and
every metric name a rule or a dashboard panel queries is one the services export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from guardmesh.monitoring import PROMETHEUS_NAMES

from .conftest import REPO

PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "guardmesh.json"
#: Series Prometheus derives from a histogram's name.
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (`make test` does, as root)")
    return subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def _metric_names(expr: str) -> set[str]:
    """The guardmesh and RPC metric names a PromQL expression reads (label names left out)."""
    without_labels = re.sub(r"\{[^}]*\}|\b(?:by|without)\s*\([^)]*\)", " ", expr)
    return set(re.findall(r"\b((?:guardmesh|rpc)_[a-z0-9_]+)", without_labels))


def _exported(name: str) -> bool:
    if name in PROMETHEUS_NAMES:
        return True
    base = next((name.removesuffix(s) for s in HISTOGRAM_SERIES if name.endswith(s)), None)
    return base is not None and base in PROMETHEUS_NAMES


def _rules() -> list[dict[str, object]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_the_rules_and_the_scrape_config() -> None:
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_rule_has_a_unit_test_that_sees_it_fire() -> None:
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in cases for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert {rule["alert"] for rule in _rules()} == fired


def test_the_rules_cover_the_monitoring_matrix_and_query_exported_names() -> None:
    queried = {name for rule in _rules() for name in _metric_names(str(rule["expr"]))}
    unknown = {name for name in queried if not _exported(name)}
    assert not unknown, f"rules query metrics no service exports: {unknown}"
    # The matrix: F1 drop, GPU utilisation, missing share, SRM, guardrail, staleness rejections, throughput drop.
    for name in (
        "guardmesh_scorer_f1_drop_ratio",
        "guardmesh_scheduler_gpu_utilization_ratio",
        "guardmesh_scorer_feature_missing_ratio",
        "guardmesh_abrouter_srm_p_value_ratio",
        "guardmesh_abrouter_guardrail_state",
        "guardmesh_paramserver_pushes_total",
    ):
        assert name in queried, name


def test_dashboard_is_valid_json_whose_panels_query_exported_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and dashboard["uid"] == "guardmesh"
    queried = {name for expr in exprs for name in _metric_names(expr)}
    unknown = {name for name in queried if not _exported(name)}
    assert not unknown, f"panels query metrics no service exports: {unknown}"
    # Every exported metric has a panel.
    assert {name for name in PROMETHEUS_NAMES if not any(q.startswith(name) for q in queried)} == set()
