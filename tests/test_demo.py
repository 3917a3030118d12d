"""``guardmesh demo`` end to end (quick): the four services and three workers as real processes, the whole
chain through them, and nothing left running afterwards."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from guardmesh.demo import REPLICAS, run_demo
from guardmesh.mesh import pid_alive

pytestmark = pytest.mark.mesh


@pytest.mark.timeout(400)
def test_quick_demo_runs_the_whole_chain_and_stops_everything(tmp_path: Path) -> None:
    out = io.StringIO()
    report = run_demo(state_dir=tmp_path / "demo", quick=True, console=Console(file=out, width=160))
    text = out.getvalue()

    # the mesh: four services as real processes, all stopped again, and the three workers too
    assert {"scheduler", "paramserver-0", "scorer", "abrouter"} <= set(report.service_pids)
    assert len(report.worker_pids) == REPLICAS
    alive = [pid for pid in [*report.service_pids.values(), *report.worker_pids] if pid_alive(pid)]
    assert not alive, f"still running: {alive}"

    # scheduler: the gang placed all at once, one distinct simulated GPU per replica, then released
    assert report.job_state == "JOB_STATE_RUNNING" and report.job_state_after == "JOB_STATE_RELEASED"
    assert sorted(p["replica"] for p in report.placements) == list(range(REPLICAS))
    gpus = [g for p in report.placements for g in p["gpus"]]
    assert len(gpus) == REPLICAS and len(set(gpus)) == REPLICAS
    assert all(cap > 0 for p in report.placements for cap in p["memory_caps_mib"])
    assert "simulated inventory" in text

    # paramserver: every worker held its lease and trained; the straggler's stale pushes were rejected
    assert all(w.exit_code == 0 and w.steps > 0 and w.renewals >= 1 and not w.lease_lost for w in report.workers)
    assert report.rejections[report.straggler] > 0
    assert report.pushes_rejected_stale >= report.rejections[report.straggler]
    assert report.test_accuracy > 0.9

    # scorer: v2 published beside v1 and v3; drift rose after the shift and the threshold moved
    assert report.versions == ["v1", "v2", "v3"]
    assert report.drift_after > report.drift_before
    assert report.threshold_after != pytest.approx(report.threshold_before)
    assert report.threshold_after < report.threshold_before  # base x (1 - k x drift): more drift, lower
    assert report.top_drift and report.top_drift[0]["feature"] in ("mean_texture", "worst_texture", "texture_error")

    # abrouter and scorer: the bad version is stopped twice, by the always-valid guardrail in its experiment
    # (v3 gets about 1 label in 10 right against v1's 9: evidence enough at the quick scale) and, promoted by
    # mistake, by the F1 monitor
    assert report.guardrail_tripped, report.router_events
    assert "sequential p=" in report.guardrail_reason
    assert any(e.startswith("GUARDRAIL_TRIPPED model-v3-candidate") for e in report.router_events)
    assert report.bad_arm_served_after_trip == 0
    assert report.f1_rollback
    assert report.active_version == "v2" and any(e.startswith("rollback: v3 -> v2") for e in report.scorer_events)

    # reports: audit, analysis, shadow, traces
    assert report.audit["exposures"] > 0 and 0.0 <= report.audit["srm_p_value"] <= 1.0
    assert {a["experiment"] for a in report.analysis} >= {"model-v2-rollout"}
    v2 = next(a for a in report.analysis if a["experiment"] == "model-v2-rollout")
    assert v2["n_control"] > 0 and v2["n_treatment"] > 0 and v2["effect"] > 0
    assert report.shadow["version"] == "v3" and report.shadow["compared"] > 0
    assert report.trace_ids and all(re.fullmatch(r"[0-9a-f]{32}", t) for t in report.trace_ids)
    assert all(t in text for t in report.trace_ids)
    for heading in ("audit of", "A/B analysis of", "drift of", "shadow report", "router events", "scorer events"):
        assert heading in text, heading
