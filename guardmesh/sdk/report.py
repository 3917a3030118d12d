"""Human-readable A/B report, rendered client-side from an ``AnalyzeExperiment`` answer: the multi-metric table
and the plots that show where an effect comes from.

Records come from :func:`guardmesh.sdk.abrouter.analysis_from_pb`; ``guardmesh abrouter report KEY`` and the demo
render them here, so no client imports the service.

The table puts the headline effect beside every correction (CUPED, winsorised, without the top 1 %, position
post-stratified, weighted) and the correction factor, so a lift carried by slot positions, novelty or a few heavy
users is visible at a glance. The plots are a forest plot (effect and CI per metric and arm, raw beside corrected)
and the daily effect by day since first exposure (novelty / primacy). Matplotlib runs through its object API on
the Agg canvas: no pyplot global state, no display needed, safe to call from any thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import JustifyMethod
from rich.table import Table

from guardmesh.sdk.abrouter import MetricAnalysis

__all__ = ["analysis_table", "plot_analysis"]

_DASH = "-"


def _num(x: float | None) -> str:
    if x is None:
        return _DASH
    if math.isnan(x):
        return "nan"
    return f"{x:.4g}"


def _pct(x: float | None) -> str:
    if x is None:
        return _DASH
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else str(x)
    return f"{x:+.1%}"


def _p(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _arm(arm_names: Sequence[str], index: int) -> str:
    if not 0 <= index < len(arm_names):
        raise ValueError(f"arm_names: has {len(arm_names)} names, no name for arm {index}")
    return arm_names[index]


def _factor_style(factor: float) -> str:
    if not math.isfinite(factor):
        return "dim"
    return "" if 0.8 <= factor <= 1.25 else "bold red"


def _trend(r: MetricAnalysis) -> str:
    if r.novelty:
        return f"[bold yellow]novelty[/] ({_num(r.novelty_slope)}/d)"
    if r.primacy:
        return f"[bold cyan]primacy[/] ({_num(r.novelty_slope)}/d)"
    return _DASH if math.isnan(r.novelty_slope) else "none"


def analysis_table(results: Sequence[MetricAnalysis], arm_names: Sequence[str]) -> Table:
    """The multi-metric table: one row per metric x treatment arm, raw effect beside every correction."""
    table = Table(title="A/B analysis", header_style="bold", caption_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [
        ("Metric", "left"),
        ("Arm", "left"),
        ("n (c/t)", "right"),
        ("Control", "right"),
        ("Treatment", "right"),
        ("Effect [CI]", "right"),
        ("Rel.", "right"),
        ("p", "right"),
        ("P(better)", "right"),
        ("CUPED (VR)", "right"),
        ("Winsor.", "right"),
        ("w/o top 1% (share)", "right"),
        ("Position", "right"),
        ("Weighted", "right"),
        ("Trend", "left"),
        ("Corrected (x)", "right"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for r in results:
        significant = math.isfinite(r.p_value) and r.p_value < 0.05
        effect_style = ("green" if r.effect > 0 else "red") if significant else ""
        effect = f"{_num(r.effect)} [{_num(r.ci.low)}, {_num(r.ci.high)}]"
        cuped = _DASH
        if r.cuped_effect is not None:
            vr = _DASH if r.variance_reduction is None else f"{r.variance_reduction:.0%}"
            cuped = f"{_num(r.cuped_effect)} ({vr})"
        top_share = "nan" if math.isnan(r.top_share_of_effect) else f"{r.top_share_of_effect:.0%}"
        factor_style = _factor_style(r.correction_factor)
        factor = f"{_num(r.corrected_effect)} (x{_num(r.correction_factor)})"
        table.add_row(
            r.metric,
            f"{_arm(arm_names, r.treatment)} vs {_arm(arm_names, r.control)}",
            f"{r.n_control}/{r.n_treatment}",
            _num(r.control_mean),
            _num(r.treatment_mean),
            f"[{effect_style}]{effect}[/]" if effect_style else effect,
            _pct(r.relative_effect),
            _p(r.p_value),
            f"{r.prob_treatment_better:.3f}" if math.isfinite(r.prob_treatment_better) else "nan",
            cuped,
            _num(r.winsorized_effect),
            f"{_num(r.effect_without_top)} ({top_share})",
            _num(r.position_corrected_effect),
            _num(r.weighted_effect),
            _trend(r),
            f"[{factor_style}]{factor}[/]" if factor_style else factor,
        )
    notes = [f"{r.metric} {_arm(arm_names, r.treatment)}: {r.detail}" for r in results if r.detail]
    if notes:
        table.caption = "\n".join(notes)
    return table


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return f"{slug}_" if slug else ""


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


def _forest(results: Sequence[MetricAnalysis], arm_names: Sequence[str], title: str) -> Figure:
    metrics = list(dict.fromkeys(r.metric for r in results))
    rows_per = {m: [r for r in results if r.metric == m] for m in metrics}
    heights = [max(1, len(rows_per[m])) for m in metrics]
    fig = Figure(figsize=(8.5, 1.2 + 0.55 * sum(heights) + 0.6 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        rows = rows_per[metric]
        labels = [f"{_arm(arm_names, r.treatment)} vs {_arm(arm_names, r.control)}" for r in rows]
        ys = list(range(len(rows)))[::-1]
        for y, r in zip(ys, rows, strict=True):
            ax.hlines(y + 0.12, r.ci.low, r.ci.high, color="tab:blue", lw=2)
            ax.plot(r.effect, y + 0.12, "o", color="tab:blue", label="raw effect, CI" if y == ys[0] else None)
            if r.cuped_effect is not None and r.cuped_ci is not None:
                ax.hlines(y - 0.12, r.cuped_ci.low, r.cuped_ci.high, color="tab:green", lw=2)
                ax.plot(r.cuped_effect, y - 0.12, "s", color="tab:green", label="CUPED, CI" if y == ys[0] else None)
            if math.isfinite(r.corrected_effect):
                ax.plot(r.corrected_effect, y, "D", color="tab:red", label="corrected" if y == ys[0] else None)
        ax.axvline(0.0, color="grey", lw=1, ls="--")
        ax.set_yticks(ys, labels)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_title(metric, loc="left", fontsize=10)
    axes[-1].set_xlabel("effect (treatment - control, per-unit mean)")
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{title}: effects" if title else "A/B effects", fontsize=11)
    fig.tight_layout(rect=(0.0, 0.05, 1.0, 1.0))
    return fig


def _daily(results: Sequence[MetricAnalysis], arm_names: Sequence[str], title: str) -> Figure | None:
    def has_days(metric: str) -> bool:
        return any(len(r.daily) >= 2 for r in results if r.metric == metric)

    metrics = [m for m in dict.fromkeys(r.metric for r in results) if has_days(m)]
    if not metrics:
        return None
    fig = Figure(figsize=(8.5, 0.5 + 2.6 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        flags = []
        for r in (r for r in results if r.metric == metric and len(r.daily) >= 2):
            days = [d.day for d in r.daily]
            effects = [d.effect for d in r.daily]
            label = f"{_arm(arm_names, r.treatment)} vs {_arm(arm_names, r.control)}"
            ax.plot(days, effects, "o-", ms=4, label=label)
            if r.novelty or r.primacy:
                flags.append(f"{label}: {'novelty' if r.novelty else 'primacy'}")
        ax.axhline(0.0, color="grey", lw=1, ls="--")
        ax.set_title(metric + (f"  [{'; '.join(flags)}]" if flags else ""), loc="left", fontsize=10)
        ax.set_ylabel("daily effect")
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("days since first exposure")
    heading = "effect by day since first exposure (units active that day)"
    fig.suptitle(f"{title}: {heading}" if title else heading.capitalize(), fontsize=11)
    fig.tight_layout()
    return fig


def plot_analysis(
    results: Sequence[MetricAnalysis], arm_names: Sequence[str], out_dir: Path, *, title: str = ""
) -> list[Path]:
    """Write the forest plot and (when a metric has >= 2 days of effects) the daily-effect plot; return the paths.

    Files are ``<title slug>_forest.png`` and ``<title slug>_daily.png`` in ``out_dir`` (created if missing).
    """
    if not results:
        raise ValueError("results: nothing to plot (empty)")
    for r in results:  # fail before writing anything
        _arm(arm_names, r.treatment)
        _arm(arm_names, r.control)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = _slug(title)
    paths = [_save(_forest(results, arm_names, title), out / f"{prefix}forest.png")]
    daily = _daily(results, arm_names, title)
    if daily is not None:
        paths.append(_save(daily, out / f"{prefix}daily.png"))
    return paths
