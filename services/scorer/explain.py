"""Per-request explanations and the feature-level view of drift: which features moved the score, and how.

Two attribution methods, chosen by :func:`explain`:

* **Exact linear SHAP** for models whose score is a linear function of the inputs, or the sigmoid of one
  (``nn.Linear`` with one output, ``nn.Sequential(Linear, Sigmoid)``, see :func:`is_linear`). The
  interventional Shapley value of feature *i* is ``w_i * (x_i - E[x_i])`` in the linear (log-odds or raw
  score) space. It is exact, not sampled, and sums to ``f(x) - f(E[x])`` in that space.
* **Integrated Gradients** (captum) for every other network: the path integral of the gradient along the
  straight line from a baseline (the background mean) to ``x``, in the model's output space. It sums to
  ``f(x) - f(baseline)`` up to the quadrature error, which is returned as the completeness error.

Both use the same reference point, the background mean, so ``baseline_score`` means the same thing for
either method. :class:`AttributionDrift` compares mean attributions between a reference and a live
window: because attributions are additive, the per-feature change of the signed mean splits the change of
the mean score between the windows into one share per feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from guardmesh.attribution import AttributionChange
from guardmesh.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "AttributionDrift",
    "AttributionDriftReport",
    "Explanation",
    "FeatureAttributionDrift",
    "LinearModel",
    "attribution_shift",
    "explain",
    "integrated_gradients",
    "is_linear",
    "linear_model",
    "linear_shap",
]

Method = Literal["linear_shap", "integrated_gradients"]
#: The space the attributions (and scores) of an explanation are measured in.
Space = Literal["log-odds", "raw score", "model output"]

#: Probe rows used to confirm, numerically, that a structurally linear model computes what it appears to.
_PROBE_ROWS = 4


@dataclass(frozen=True)
class LinearModel:
    """The parameters of a model detected as linear: ``score = x @ weight + bias``, then ``link``.

    ``link`` is ``"sigmoid"`` for logistic models (the score is then in log-odds) and ``"identity"``
    otherwise.
    """

    weight: torch.Tensor  # (n_features,)
    bias: torch.Tensor  # () scalar; zero when the layer has no bias
    link: Literal["identity", "sigmoid"]


@dataclass(frozen=True)
class Explanation:
    """Per-feature attributions of one request (or a batch of requests) and how far to trust them.

    Shapes: ``attributions`` has the shape of ``x``; ``score`` and ``completeness_error`` have the shape
    of ``x`` without its last (feature) dimension; ``baseline`` has ``n_features`` entries.
    """

    #: One attribution per feature, in ``space`` units; they add up to ``score - baseline_score``.
    attributions: torch.Tensor
    #: ``"linear_shap"`` (exact) or ``"integrated_gradients"`` (approximate, see ``completeness_error``).
    method: Method
    #: ``"log-odds"`` (logistic models), ``"raw score"`` (linear models) or ``"model output"`` (IG).
    space: Space
    #: The reference point the attributions are measured from: the mean of the background rows.
    baseline: torch.Tensor
    #: The model's score at the baseline, in ``space``.
    baseline_score: float
    #: The model's score at ``x``, in ``space``.
    score: torch.Tensor
    #: ``|sum(attributions) - (score - baseline_score)|``: rounding only for linear SHAP, the quadrature
    #: error of the path integral for Integrated Gradients (more ``steps`` make it smaller).
    completeness_error: torch.Tensor


def linear_model(model: nn.Module) -> LinearModel | None:
    """The weight, bias and link of ``model`` when its score is a (sigmoid of a) linear function, else None.

    Detected structures, eager or TorchScript (``torch.jit.script`` / ``torch.jit.trace``):

    * ``nn.Linear(n, 1)`` (link ``identity``; the score is the raw output);
    * ``nn.Sequential(nn.Linear(n, 1))`` (the same);
    * ``nn.Sequential(nn.Linear(n, 1), nn.Sigmoid())`` (link ``sigmoid``; the score is the log-odds).

    Eager modules must be exactly these classes (a subclass may override ``forward``); TorchScript modules
    are matched by their recorded original class names. Either way the detection is then confirmed
    numerically: the model's output on a few fixed probe rows must match ``link(x @ w + b)``, so a module
    that only looks linear (forward hooks, a look-alike class named ``Linear``) is not treated as one.
    Anything else (more outputs, other layers, ``nn.Softmax``) is not linear for this purpose.
    """
    parts = _linear_structure(model)
    if parts is None:
        return None
    layer, link = parts
    weight = layer.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != 1:
        return None
    bias = getattr(layer, "bias", None)
    w = weight.detach().reshape(-1)
    b = bias.detach().reshape(()) if isinstance(bias, torch.Tensor) else torch.zeros((), dtype=w.dtype)
    found = LinearModel(weight=w, bias=b.to(device=w.device, dtype=w.dtype), link=link)
    return found if _computes_linear(model, found) else None


def is_linear(model: nn.Module) -> bool:
    """True when ``model``'s score is a linear function of its inputs or the sigmoid of one.

    See :func:`linear_model` for exactly what is detected (``nn.Linear`` with one output, optionally
    followed by ``nn.Sigmoid`` inside an ``nn.Sequential``, eager or TorchScript, confirmed numerically).
    """
    return linear_model(model) is not None


def linear_shap(
    weight: torch.Tensor, bias: torch.Tensor | float | None, x: torch.Tensor, background_mean: torch.Tensor
) -> torch.Tensor:
    """Exact interventional SHAP values of a linear model: ``phi_i = w_i * (x_i - E[x_i])``.

    For ``f(x) = w . x + b`` and a background distribution, the interventional Shapley value of feature
    *i* (absent features drawn from the background, independently of the present ones) is exactly
    ``w_i * (x_i - E[x_i])``; the bias cancels and is accepted only so a layer's parameters can be passed
    as they are. For a logistic model ``sigmoid(w . x + b)`` pass its linear layer: the attributions are
    then in **log-odds** space and sum to ``logit f(x) - logit f(E[x])`` (they are not additive in
    probability space, where no linear formula is exact).

    Args:
        weight: ``(n_features,)`` or ``(1, n_features)``.
        bias: the bias (unused: it cancels), a scalar tensor, a float or None.
        x: ``(n_features,)`` or ``(batch, n_features)``.
        background_mean: ``(n_features,)``, the mean of the background rows.

    Returns:
        Attributions with the shape of ``x``; each row sums to ``f(x) - f(background_mean)`` in the linear
        space, up to floating-point rounding.

    Raises:
        InvalidArgument: shapes that do not agree, or a weight with more than one output.
    """
    del bias  # cancels in every difference f(x_S, E[x]) - f(x_S', E[x])
    if weight.dim() == 2 and weight.shape[0] == 1:
        weight = weight.reshape(-1)
    if weight.dim() != 1:
        raise InvalidArgument("weight", f"must be (n_features,) or (1, n_features), got {tuple(weight.shape)}")
    n = weight.shape[0]
    _check_rows("x", x, n)
    _check_baseline("background_mean", background_mean, n)
    return weight.detach() * (x.detach() - background_mean.detach())


def integrated_gradients(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor,
    steps: int = 32,
    *,
    target: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated Gradients attributions of ``model`` at ``x`` from ``baseline``, with captum's delta.

    ``IG_i = (x_i - b_i) * integral_0^1 d f(b + a (x - b)) / d x_i da``, approximated by captum's
    Gauss-Legendre quadrature with ``steps`` points. Guarantees: a feature with ``x_i == b_i`` or whose
    gradient is zero along the whole path (the model ignores it) gets exactly 0; the attributions sum to
    ``f(x) - f(baseline)`` up to the returned delta, which shrinks as ``steps`` grows for smooth models
    (ReLU kinks slow that down). The model should be in eval mode (dropout breaks completeness).

    Args:
        model: maps ``(batch, n_features)`` to ``(batch,)``, ``(batch, 1)`` or ``(batch, k)`` scores.
        x: ``(n_features,)`` or ``(batch, n_features)``.
        baseline: ``(n_features,)``, shared by every row of ``x``.
        steps: quadrature points, >= 2.
        target: which output column to explain when the model has several; None for one output.

    Returns:
        ``(attributions, delta)``: attributions with the shape of ``x``; ``delta = sum(attributions) -
        (f(x) - f(baseline))`` per row, shaped as ``x`` without its feature dimension.

    Raises:
        InvalidArgument: bad shapes or ``steps``.
    """
    from captum.attr import IntegratedGradients  # heavy import, only needed on this path

    if steps < 2:
        raise InvalidArgument("steps", f"must be >= 2, got {steps}")
    n = baseline.shape[-1] if baseline.dim() == 1 else -1
    _check_baseline("baseline", baseline, n)
    _check_rows("x", x, n)
    rows = x.detach().reshape(-1, n)
    base = baseline.detach().to(dtype=rows.dtype, device=rows.device).reshape(1, n).expand_as(rows)
    ig = IntegratedGradients(lambda t: _scalar_score(model(t), target))
    attributions, delta = ig.attribute(
        rows.clone().requires_grad_(True), baselines=base, n_steps=steps, return_convergence_delta=True
    )
    return attributions.detach().reshape(x.shape), delta.detach().reshape(x.shape[:-1])


def explain(
    model: nn.Module,
    x: torch.Tensor,
    background: torch.Tensor,
    *,
    steps: int = 32,
    target: int | None = None,
) -> Explanation:
    """Per-feature attributions of ``model`` at ``x``, by exact linear SHAP when possible, else by IG.

    The reference point is the mean of ``background`` (rows of reference data, e.g. a sample of the
    training set; a single ``(n_features,)`` row is used as it is). Linear and logistic models
    (:func:`is_linear`) get exact SHAP in raw-score or log-odds space; every other model gets Integrated
    Gradients in its output space with ``steps`` quadrature points. ``target`` selects the output column
    of a multi-output model (such a model is never treated as linear).

    Raises:
        InvalidArgument: shapes that do not agree, an empty background or non-finite inputs.
    """
    if background.dim() not in (1, 2) or background.shape[-1] == 0:
        raise InvalidArgument("background", f"must be (n_features,) or (rows, n_features), got {background.shape}")
    if background.dim() == 2 and background.shape[0] == 0:
        raise InvalidArgument("background", "needs at least one row")
    n = background.shape[-1]
    _check_rows("x", x, n)
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgument("x", "must be finite")
    if not bool(torch.isfinite(background).all()):
        raise InvalidArgument("background", "must be finite")
    baseline = background.detach().reshape(-1, n).mean(dim=0)

    linear = linear_model(model) if target is None else None
    if linear is not None:
        if linear.weight.shape[0] != n:
            raise InvalidArgument("x", f"the model takes {linear.weight.shape[0]} features, got {n}")
        w = linear.weight
        rows = x.detach().to(dtype=w.dtype, device=w.device)
        base = baseline.to(dtype=w.dtype, device=w.device)
        attributions = linear_shap(w, linear.bias, rows, base)
        score = rows @ w + linear.bias
        baseline_score = base @ w + linear.bias
        error = (attributions.sum(dim=-1) - (score - baseline_score)).abs()
        return Explanation(
            attributions=attributions,
            method="linear_shap",
            space="log-odds" if linear.link == "sigmoid" else "raw score",
            baseline=base,
            baseline_score=float(baseline_score),
            score=score,
            completeness_error=error,
        )

    attributions, delta = integrated_gradients(model, x, baseline, steps, target=target)
    with torch.no_grad():
        rows = x.detach().reshape(-1, n).to(dtype=attributions.dtype)
        score = _scalar_score(model(rows), target).reshape(x.shape[:-1])
        baseline_score = _scalar_score(model(baseline.reshape(1, n).to(dtype=rows.dtype)), target)
    return Explanation(
        attributions=attributions,
        method="integrated_gradients",
        space="model output",
        baseline=baseline,
        baseline_score=float(baseline_score.reshape(())),
        score=score,
        completeness_error=delta.abs(),
    )


@dataclass(frozen=True, kw_only=True)
class FeatureAttributionDrift(AttributionChange):
    """How one feature's attributions moved between the reference and the live window (see
    :class:`~guardmesh.attribution.AttributionChange`, whose ``shift`` ranks the features)."""

    feature: int
    name: str


@dataclass(frozen=True)
class AttributionDriftReport:
    """Per-feature attribution drift between the two windows, with the features ranked by change."""

    #: One entry per feature, in feature order.
    features: list[FeatureAttributionDrift]
    #: Feature indices, largest ``shift`` first (ties: lower index first).
    ranked: list[int]
    reference_rows: int
    live_rows: int
    #: How the attributions were computed (``Explanation.method``), when known.
    method: str = ""
    #: Their units (``Explanation.space``), when known.
    space: str = ""

    @property
    def score_change(self) -> float:
        """Sum of the per-feature ``change_mean``: the change of the mean score between the windows.

        Exact for linear SHAP (up to rounding) and up to the completeness errors for IG, provided every
        row was explained against the same baseline.
        """
        return sum(f.change_mean for f in self.features)

    def top(self, k: int = 5) -> list[FeatureAttributionDrift]:
        """The ``k`` features that moved most."""
        return [self.features[i] for i in self.ranked[:k]]


class _Window:
    """A ring buffer of the most recent ``capacity`` attribution rows (float64)."""

    def __init__(self, capacity: int, n_features: int) -> None:
        self.rows = torch.zeros((capacity, n_features), dtype=torch.float64)
        self.count = 0  # rows held, <= capacity
        self.next = 0  # slot the next row goes to

    def add(self, batch: torch.Tensor) -> None:
        capacity = self.rows.shape[0]
        batch = batch[-capacity:]  # older rows would be overwritten in this same call
        k = batch.shape[0]
        first = min(k, capacity - self.next)
        self.rows[self.next : self.next + first] = batch[:first]
        self.rows[: k - first] = batch[first:]
        self.next = (self.next + k) % capacity
        self.count = min(self.count + k, capacity)

    def held(self) -> torch.Tensor:
        return self.rows[: self.count]  # order is irrelevant for means


class AttributionDrift:
    """Mean attributions per feature over a reference window and a sliding live window, compared.

    Feed it the attributions of scored requests (``Explanation.attributions``): ``add_reference`` with
    those of reference traffic (validation data, or a period the model was trusted), ``add_live`` with
    those of current traffic. Each window keeps its most recent ``window`` rows (default 1,000), so the
    live window slides with traffic. :meth:`report` gives, per feature, the mean |attribution| and the
    signed mean in both windows and their changes, and ranks the features by how much they moved.

    Why attributions and not inputs: an input may shift a lot and not matter (the model ignores it), or
    shift a little and move every decision. The signed-mean changes add up to the change of the mean
    score, so the report says which features account for decisions changing. Rows must come from one
    model, one method and one baseline; otherwise their means are not comparable.
    """

    def __init__(self, n_features: int, *, window: int = 1000, feature_names: Sequence[str] | None = None) -> None:
        if n_features < 1:
            raise InvalidArgument("n_features", f"must be >= 1, got {n_features}")
        if window < 1:
            raise InvalidArgument("window", f"must be >= 1, got {window}")
        if feature_names is not None and len(feature_names) != n_features:
            raise InvalidArgument("feature_names", f"needs {n_features} names, got {len(feature_names)}")
        self.n_features = n_features
        self.window = window
        self.feature_names = list(feature_names) if feature_names is not None else [str(i) for i in range(n_features)]
        self._reference = _Window(window, n_features)
        self._live = _Window(window, n_features)

    @property
    def reference_rows(self) -> int:
        """Rows currently in the reference window."""
        return self._reference.count

    @property
    def live_rows(self) -> int:
        """Rows currently in the live window."""
        return self._live.count

    def add_reference(self, attributions: torch.Tensor) -> None:
        """Add ``(n_features,)`` or ``(batch, n_features)`` attribution rows to the reference window."""
        self._reference.add(self._rows(attributions))

    def add_live(self, attributions: torch.Tensor) -> None:
        """Add ``(n_features,)`` or ``(batch, n_features)`` attribution rows to the live window."""
        self._live.add(self._rows(attributions))

    def rebaseline(self) -> None:
        """Make the live window the new reference (after a change was reviewed and accepted); empty live."""
        self._reference = self._live
        self._live = _Window(self.window, self.n_features)

    def report(self) -> AttributionDriftReport:
        """Per-feature means in both windows, their changes, and the features ranked by ``shift``.

        Raises:
            FailedPrecondition: either window is empty.
        """
        if self._reference.count == 0 or self._live.count == 0:
            raise FailedPrecondition(
                f"attribution drift needs rows in both windows (reference {self._reference.count}, "
                f"live {self._live.count})"
            )
        ref, live = self._reference.held(), self._live.held()
        ref_abs, ref_mean = ref.abs().mean(dim=0).tolist(), ref.mean(dim=0).tolist()
        live_abs, live_mean = live.abs().mean(dim=0).tolist(), live.mean(dim=0).tolist()
        features = [
            FeatureAttributionDrift(
                feature=i,
                name=self.feature_names[i],
                reference_mean_abs=ref_abs[i],
                reference_mean=ref_mean[i],
                live_mean_abs=live_abs[i],
                live_mean=live_mean[i],
                change_mean_abs=live_abs[i] - ref_abs[i],
                change_mean=live_mean[i] - ref_mean[i],
            )
            for i in range(self.n_features)
        ]
        ranked = sorted(range(self.n_features), key=lambda i: (-features[i].shift, i))
        return AttributionDriftReport(
            features=features, ranked=ranked, reference_rows=self._reference.count, live_rows=self._live.count
        )

    def _rows(self, attributions: torch.Tensor) -> torch.Tensor:
        _check_rows("attributions", attributions, self.n_features)
        rows = attributions.detach().reshape(-1, self.n_features).to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(rows).all()):
            raise InvalidArgument("attributions", "must be finite")
        return rows


def attribution_shift(
    model: nn.Module,
    reference_rows: torch.Tensor,
    live_rows: torch.Tensor,
    baseline: torch.Tensor,
    fill: torch.Tensor,
    feature_names: Sequence[str],
    *,
    steps: int = 32,
) -> AttributionDriftReport:
    """Each feature's attribution shift between reference rows and live rows, as the scorer serves it.

    Both windows are explained the way a scored request is (:func:`explain`, exact linear SHAP or Integrated
    Gradients) from the same ``baseline`` (the reference mean, ``(n_features,)``), after missing values (NaN)
    are filled from ``fill`` (the reference medians), as the served path imputes them; a row with a value
    still missing is left out. The report ranks the features by :attr:`FeatureAttributionDrift.shift`.

    Raises:
        FailedPrecondition: no complete row in a window, or a baseline that is not finite.
        InvalidArgument: shapes that do not agree, or a model that cannot be explained (``explain``).
    """
    n = len(feature_names)
    if not bool(torch.isfinite(baseline).all()):
        raise FailedPrecondition("attribution drift: the reference has a feature with no finite mean")
    windows = []
    for field, rows in (("reference", reference_rows), ("live", live_rows)):
        _check_rows(field, rows, n)
        rows = rows.reshape(-1, n)
        rows = torch.where(torch.isnan(rows), fill.to(rows).unsqueeze(0), rows)
        rows = rows[torch.isfinite(rows).all(dim=1)]
        if rows.shape[0] == 0:
            raise FailedPrecondition(f"attribution drift: the {field} window holds no row to explain")
        windows.append(rows)
    # The model's own dtype (float32 for served models): its weights do not take float64 inputs.
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    reference, live = (rows.to(dtype) for rows in windows)
    base = baseline.to(reference).unsqueeze(0)
    ref_e = explain(model, reference, base, steps=steps)
    live_e = explain(model, live, base, steps=steps)
    drift = AttributionDrift(n, window=max(len(reference), len(live)), feature_names=feature_names)
    drift.add_reference(ref_e.attributions)
    drift.add_live(live_e.attributions)
    report = drift.report()
    return AttributionDriftReport(
        features=report.features,
        ranked=report.ranked,
        reference_rows=report.reference_rows,
        live_rows=report.live_rows,
        method=ref_e.method,
        space=ref_e.space,
    )


def _linear_structure(model: nn.Module) -> tuple[nn.Module, Literal["identity", "sigmoid"]] | None:
    """The linear layer and link of a (possibly scripted) Linear / Sequential(Linear[, Sigmoid]), or None."""
    if _kind(model) == "Linear":
        return model, "identity"
    if _kind(model) != "Sequential":
        return None
    children = list(model.children())
    if len(children) == 1 and _kind(children[0]) == "Linear":
        return children[0], "identity"
    if len(children) == 2 and _kind(children[0]) == "Linear" and _kind(children[1]) == "Sigmoid":
        return children[0], "sigmoid"
    return None


def _kind(module: nn.Module) -> str | None:
    """The class name for exactly nn.Linear, nn.Sequential or nn.Sigmoid (eager or TorchScript), else None."""
    if isinstance(module, torch.jit.ScriptModule):
        name = getattr(module, "original_name", None)
        return name if name in ("Linear", "Sequential", "Sigmoid") else None
    exact = {nn.Linear: "Linear", nn.Sequential: "Sequential", nn.Sigmoid: "Sigmoid"}
    return exact.get(type(module))


def _computes_linear(model: nn.Module, found: LinearModel) -> bool:
    """Whether ``model`` really outputs ``link(x @ w + b)`` on a few fixed probe rows."""
    w = found.weight
    probe = torch.randn((_PROBE_ROWS, w.shape[0]), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = probe.to(dtype=w.dtype, device=w.device)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception:  # a model that cannot even run the probe is not one we can explain exactly
        return False
    if not isinstance(out, torch.Tensor) or out.numel() != _PROBE_ROWS:
        return False
    expected = probe @ w + found.bias
    if found.link == "sigmoid":
        expected = torch.sigmoid(expected)
    tol = 1e3 * torch.finfo(w.dtype).eps if w.dtype.is_floating_point else 0.0
    return bool(torch.allclose(out.reshape(-1), expected, rtol=tol, atol=tol))


def _scalar_score(out: torch.Tensor, target: int | None) -> torch.Tensor:
    """One score per row from a model output: ``(batch,)``, ``(batch, 1)`` or column ``target``."""
    if target is not None:
        return out[:, target]
    if out.dim() == 2 and out.shape[1] == 1:
        return out[:, 0]
    if out.dim() == 1:
        return out
    raise InvalidArgument("target", f"the model has outputs of shape {tuple(out.shape[1:])}; name a column")


def _check_rows(field: str, x: torch.Tensor, n_features: int) -> None:
    if x.dim() not in (1, 2) or (n_features >= 0 and x.shape[-1] != n_features):
        raise InvalidArgument(field, f"must be (n_features,) or (batch, n_features) with {n_features} features")


def _check_baseline(field: str, baseline: torch.Tensor, n_features: int) -> None:
    if baseline.dim() != 1 or (n_features >= 0 and baseline.shape[0] != n_features):
        raise InvalidArgument(field, f"must be (n_features,) with {n_features} features, got {tuple(baseline.shape)}")
