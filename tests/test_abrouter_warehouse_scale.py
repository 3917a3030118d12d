"""The table audit aggregates inside DuckDB (issue #20 item 2) and still gives the in-memory answers, on tables
large enough for the paths a small router test never reaches: more units than the id tests' sample (the
sampled rows must be the same ones), repeats, a continuous covariate (every value distinct: KS from per-value
counts with one value per row), a second experiment sharing units (carry-over), coverage below 1.

The in-memory side is ``audit.full_audit`` over the per-unit columns of the same table (``exposure_columns``,
which the router-level test in test_abrouter_warehouse.py shows equal to the router's own columns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.exposure_table import write_exposure_table
from services.abrouter import audit as audit_mod
from services.abrouter import warehouse
from services.abrouter.audit import AuditReport
from services.abrouter.experiments import ArmSpec, Experiment, ExperimentSpec, ExperimentState
from services.abrouter.warehouse import audit_table, exposure_columns, id_sample_rows


def experiment(key: str, coverage: float = 1.0) -> Experiment:
    spec = ExperimentSpec(key=key, arms=(ArmSpec("control", 0.5), ArmSpec("treatment", 0.5)), coverage=coverage)
    return Experiment(spec, 1, ExperimentState.RUNNING, spec.weights, 0.0, 0.0)


def in_memory(
    table_url: str, exp: Experiment, since: int = 1, by_categorical: tuple[str, ...] | None = None
) -> AuditReport:
    columns, versions = exposure_columns(table_url, exp.key)
    others = [k for k in ("other",) if k != exp.key]
    other_arms = {}
    for other in others:
        theirs, _ = exposure_columns(table_url, other)
        arm_of = dict(zip(theirs.unit_ids.tolist(), theirs.arms.tolist(), strict=True))
        other_arms[other] = np.array([arm_of.get(u, -1) for u in columns.unit_ids.tolist()], dtype=np.int64)
    report = audit_mod.full_audit(
        columns,
        exp.propensities(),
        other_arms={k: v for k, v in other_arms.items() if (v >= 0).any()},
        min_sample=1000,
        min_deviation=0.01,
        ranges=exp.ranges(),
        resolution=10_000,
        by_categorical=by_categorical,
    )
    return audit_mod.with_srm_since(
        report, columns.arms, versions, since, exp.propensities(), min_sample=1000, min_deviation=0.01
    )


def identical(a: AuditReport, b: AuditReport) -> None:
    """Same report: counts and words exactly, statistics to the last bits float summation order may change."""
    assert (a.exposures, a.alert, a.reasons, a.notes) == (b.exposures, b.alert, b.reasons, b.notes)
    assert (a.srm.observed, a.srm.alert, a.srm.reason) == (b.srm.observed, b.srm.alert, b.srm.reason)
    assert a.srm.p_value == pytest.approx(b.srm.p_value, rel=1e-12, abs=1e-300)
    assert a.uniformity.detail == b.uniformity.detail
    assert a.uniformity.p_value == pytest.approx(b.uniformity.p_value, rel=1e-12, abs=1e-300)
    assert [(t.name, t.dof, t.alert, t.detail) for t in a.clustering] == [
        (t.name, t.dof, t.alert, t.detail) for t in b.clustering
    ]
    for x, y in zip(a.clustering, b.clustering, strict=True):
        assert x.statistic == pytest.approx(y.statistic, rel=1e-12), x.name
        assert x.p_value == pytest.approx(y.p_value, rel=1e-9, abs=1e-300), x.name
    assert [(r.covariate, r.window, r.arm_a, r.arm_b, r.test, r.n_a, r.n_b, r.imbalanced) for r in a.balance] == [
        (r.covariate, r.window, r.arm_a, r.arm_b, r.test, r.n_a, r.n_b, r.imbalanced) for r in b.balance
    ]
    for p, q in zip(a.balance, b.balance, strict=True):
        where = (p.covariate, p.window, p.arm_b)
        if p.test == "ks":  # D from integer counts on both paths: bit for bit
            assert p.statistic == q.statistic, where
            assert p.p_value == q.p_value, where
        else:
            assert p.statistic == pytest.approx(q.statistic, rel=1e-12), where
            assert p.p_value == pytest.approx(q.p_value, rel=1e-9, abs=1e-300), where
        # sums of centred values in another order: the mean difference agrees to ~1e-12 of a standard deviation
        assert p.effect_size == pytest.approx(q.effect_size, rel=1e-9, abs=1e-12), where
    assert a.balance_alpha == b.balance_alpha


@pytest.mark.parametrize("n", [audit_mod.ID_SAMPLE_MAX, audit_mod.ID_SAMPLE_MAX + 1, 1_000_000, 3_333_333])
def test_the_id_sample_drawn_in_chunks_is_the_in_memory_sample(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warehouse, "SAMPLE_CHUNK", 100_003)  # many chunks, one cut mid-way
    expected = audit_mod._id_sample(n)
    got = id_sample_rows(n)
    if expected is None:
        assert got is None
    else:
        assert got is not None and np.array_equal(got, expected)


def test_a_table_past_the_id_sample_with_repeats_and_continuous_values_gives_the_in_memory_answers(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "table")
    # 260,000 exposures, every 10th a repeat: 234,000 units, more than the id tests' 200,000-unit sample
    write_exposure_table(url, 260_000, key="main", days=40, continuous=True)
    # a second experiment over part of the same units, ids after the first's: carry-over
    write_exposure_table(url, 50_000, key="other", days=5, first_id=300_000, unit_offset=100_000)
    exp = experiment("main")
    from_table = audit_table(url, exp, 1, min_sample=1000, min_deviation=0.01)
    memory = in_memory(url, exp)
    assert from_table.exposures == 234_000
    assert any("deterministic random sample of" in t.detail for t in from_table.clustering)
    assert any(t.name == "carry_over:other" and t.dof == 1 for t in from_table.clustering)
    assert {r.covariate for r in from_table.balance} == {"age", "dose", "lesion_mm", "score", "device", "region"}
    identical(from_table, memory)


def test_coverage_below_one_and_a_weight_change_give_the_in_memory_answers(tmp_path: Path) -> None:
    url = str(tmp_path / "table")
    write_exposure_table(url, 40_000, key="main", days=10, coverage=0.6, sessions=1500)
    exp = experiment("main", coverage=0.6)
    covered = audit_table(url, exp, 1)
    # an id-like categorical (1,500 values): noted, no windows by it, still compared between arms
    assert covered.notes == ("session: 1500 values, more than 1000: no windows by it",)
    assert "arm_share:session" not in {t.name for t in covered.clustering}
    assert any(r.covariate == "session" for r in covered.balance)
    identical(covered, in_memory(url, exp))
    # named for windows, it gets them on both paths
    windowed = audit_table(url, exp, 1, window_covariates=["session"])
    assert "arm_share:session" in {t.name for t in windowed.clustering}
    identical(windowed, in_memory(url, exp, by_categorical=("session",)))
    # units all exposed before revision 2: SRM since then has no units, on both paths
    since = audit_table(url, exp, 2)
    identical(since, in_memory(url, exp, since=2))
    assert "since version 2" in since.srm.reason
    # the same units audited against coverage 0.3: half of them lie outside its ranges, an alert on both paths
    narrow = experiment("main", coverage=0.3)
    flagged = audit_table(url, narrow, 1)
    assert flagged.uniformity.alert and "outside every covered range" in flagged.uniformity.detail
    identical(flagged, in_memory(url, narrow))


def test_an_audit_past_its_memory_limit_says_so_and_does_not_call_the_table_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardmesh.errors import ResourceExhausted
    from services.abrouter.export import ExportCorrupt

    url = str(tmp_path / "table")
    write_exposure_table(url, 300_000, key="main", days=30)
    monkeypatch.setattr(warehouse, "MEMORY_LIMIT", "8MB")
    with pytest.raises(ResourceExhausted, match="MEMORY_LIMIT") as info:
        audit_table(url, experiment("main"), 1)
    assert not isinstance(info.value, ExportCorrupt)


@pytest.mark.parametrize(("key_sample", "joint_groups"), [(0, warehouse.JOINT_GROUPS), (50, 1)])
def test_names_past_the_leading_rows_and_sets_counted_one_by_one_give_the_in_memory_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_sample: int, joint_groups: int
) -> None:
    """Covariate names come from the leading rows and the scan counts those it did not know: with none known
    (KEY_SAMPLE 0) every name is found again, and a name logged only by later units (``session``) is found;
    with JOINT_GROUPS 1 no grouping set is summed from the joint one, each is counted from the rows."""
    url = str(tmp_path / "table")
    write_exposure_table(url, 30_000, key="main", days=8)
    # later units, ids after the first's, log one more categorical
    write_exposure_table(url, 6_000, key="main", days=8, first_id=100_000, unit_offset=1_000_000, sessions=40)
    monkeypatch.setattr(warehouse, "KEY_SAMPLE", key_sample)
    monkeypatch.setattr(warehouse, "JOINT_GROUPS", joint_groups)
    exp = experiment("main")
    from_table = audit_table(url, exp, 1)
    assert {r.covariate for r in from_table.balance} == {"age", "dose", "lesion_mm", "device", "region", "session"}
    assert "arm_share:session" in {t.name for t in from_table.clustering}
    identical(from_table, in_memory(url, exp))


def test_units_sharing_the_hash_they_are_grouped_by_are_told_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-unit aggregate keys units by a 64-bit hash; units sharing it (here forced: a hash with 97 values
    for 27,000 units) are seen by the second hash and the audit keys by the unit itself: the in-memory answers."""
    url = str(tmp_path / "table")
    write_exposure_table(url, 30_000, key="main", days=8)
    exp = experiment("main")
    monkeypatch.setattr(warehouse, "UNIT_HASH", "hash(unit) % 97")
    shared = audit_table(url, exp, 1)
    assert shared.exposures == 27_000
    identical(shared, in_memory(url, exp))
    # the second hash is what tells them apart: without it every unit sharing a value is one unit
    monkeypatch.setattr(warehouse, "UNIT_CHECK_HASH", "0")
    assert audit_table(url, exp, 1).exposures == 97


@pytest.mark.parametrize("block_bits", [0, 3, 9, 40])
def test_the_id_sample_found_by_blocks_of_ids_is_the_in_memory_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bits: int
) -> None:
    """The sampled first exposures are placed in blocks of 2^bits ids by the scan's per-block counts and ranked
    within the blocks read again: blocks of one id, of a few (repeats inside and across them), of more ids than
    the table holds (one block): the same units as the in-memory audit's sample, so the same id tests."""
    url = str(tmp_path / "table")
    write_exposure_table(url, 30_000, key="main", days=4)
    monkeypatch.setattr(audit_mod, "ID_SAMPLE_MAX", 2_000)  # both paths sample 1,986 of the 27,000 units
    monkeypatch.setattr(warehouse, "SAMPLE_BLOCK_BITS", block_bits)
    exp = experiment("main")
    from_table = audit_table(url, exp, 1)
    assert any("deterministic random sample of 1986 of 27000 units" in t.detail for t in from_table.clustering)
    identical(from_table, in_memory(url, exp))


@pytest.mark.parametrize("cell_hash", [warehouse.CELL_HASH, "(hash({}) % 2)"])
def test_numeric_sets_by_categorical_cell_give_the_in_memory_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cell_hash: str
) -> None:
    """The numeric sets by categorical are counted per cell (a hash of the row's categorical values) and summed
    back through the joint set's cells; cells sharing the hash (here forced: two values for 9 x 13 cells) are
    found and the sets counted per categorical instead: the in-memory answers either way."""
    url = str(tmp_path / "table")
    write_exposure_table(url, 30_000, key="main", days=6)
    monkeypatch.setattr(warehouse, "CELL_HASH", cell_hash)
    exp = experiment("main")
    from_table = audit_table(url, exp, 1)
    windows = {(r.covariate, r.window.split(":")[0]) for r in from_table.balance}
    assert windows >= {("age", "device"), ("dose", "region")}
    identical(from_table, in_memory(url, exp))
