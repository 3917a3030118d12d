"""Versioned model registry: load, warm up, activate, list, roll back.

A version is a PyTorch model in one of three forms: a TorchScript file, a ``torch.export`` program, or a
registered architecture plus a ``state_dict`` (safetensors). A version that fails to load or to pass its
warm-up batch is refused and the active one keeps serving. Models run on CUDA when a GPU is visible, on the
CPU otherwise; the device is chosen once, at start.
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from guardmesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

#: Architectures a ``state_dict`` version may name: a factory taking ``n_features`` and keyword options.
ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {}


def architecture(name: str) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    """Register a model factory under ``name`` (decorator)."""

    def register(factory: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        ARCHITECTURES[name] = factory
        return factory

    return register


@architecture("logistic")
def logistic(n_features: int) -> torch.nn.Module:
    """Logistic regression: one linear layer and a sigmoid."""
    return torch.nn.Sequential(torch.nn.Linear(n_features, 1), torch.nn.Sigmoid())


@architecture("mlp")
def mlp(n_features: int, hidden: tuple[int, ...] = (256, 256)) -> torch.nn.Module:
    """A ReLU MLP with a sigmoid output."""
    layers: list[torch.nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers += [torch.nn.Linear(width, 1), torch.nn.Sigmoid()]
    return torch.nn.Sequential(*layers)


class ModelFormat(Enum):
    """How a version's bytes are to be read."""

    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch_export"
    STATE_DICT = "state_dict"


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when visible (and not disabled), else CPU."""
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer.startswith("cuda") or (prefer == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InvalidArgument("scorer.device", f"{prefer!r} asked but no CUDA device is visible")
        return torch.device(prefer if prefer != "auto" else "cuda")
    return torch.device("cpu")


@dataclass
class ModelVersion:
    """A loaded, warmed-up version."""

    name: str
    version: str
    features: tuple[str, ...]
    module: Callable[[torch.Tensor], torch.Tensor]
    fmt: ModelFormat
    loaded_at: float
    raw_module: torch.nn.Module | None = None

    def scores(self, x: torch.Tensor) -> np.ndarray:
        """:meth:`__call__` as a float32 numpy array, shape (batch,), for the batcher's forward.

        Why not ``self(x).float().cpu().numpy()``: every tensor method call releases the GIL and takes it back,
        and the group's thread that runs the forward waits up to the interpreter's switch interval (5 ms) for
        it each time while the event loop is busy taking calls up. Here the module's call is the only such
        step for a CPU model with float32 output; the rest is numpy (views). Measured at 64 clients, small MLP,
        interleaved against the old path (loaded machine): 1,722 vs 1,604 and 1,854 vs 1,706 req/s, p99 65 vs
        85 and 60 vs 74 ms, CPU per request unchanged; the heavy MLP unchanged (its forward dominates)."""
        if x.shape[0] == 0:
            return np.empty(0, np.float32)
        with torch.inference_mode():
            out = self.module(x)
        if out.device.type != "cpu" or out.dtype != torch.float32:
            out = out.float().cpu()
        return out.numpy().reshape(x.shape[0], -1)[:, 0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1] for a (batch, features) float32 tensor, shape (batch,)."""
        if x.shape[0] == 0:  # an empty batch (the Open Inference Protocol allows one): nothing to run
            return torch.empty(0, device=x.device)
        with torch.inference_mode():
            out = self.module(x)
        return out.reshape(x.shape[0], -1)[:, 0]


@dataclass
class ModelLine:
    """All versions of one model name, the active one and the activation history (for rollback)."""

    versions: dict[str, ModelVersion] = field(default_factory=dict)
    active: str | None = None
    history: list[str] = field(default_factory=list)


def load_module(
    fmt: ModelFormat,
    payload: bytes,
    device: torch.device,
    *,
    arch: str = "",
    n_features: int = 0,
    options: dict[str, object] | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.nn.Module | None]:
    """Deserialize a model; raise InvalidArgument naming what is wrong."""
    try:
        if fmt is ModelFormat.TORCHSCRIPT:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream but still what many teams ship; we keep loading it.
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(io.BytesIO(payload), map_location=device)
            module.eval()
            return module, module
        if fmt is ModelFormat.TORCH_EXPORT:
            program = torch.export.load(io.BytesIO(payload))
            exported = program.module()
            exported.to(device)
            return exported, None
        factory = ARCHITECTURES.get(arch)
        if factory is None:
            raise InvalidArgument("architecture", f"unknown architecture {arch!r} (known: {sorted(ARCHITECTURES)})")
        from safetensors.torch import load as st_load

        state = st_load(payload)
        with torch.device("meta"):  # shapes only: nothing is allocated for an architecture the payload cannot fill
            skeleton = factory(n_features, **(options or {}))
        elements = sum(t.numel() for t in (*skeleton.parameters(), *skeleton.buffers()))
        if elements > len(payload):  # every stored element takes at least one byte
            raise InvalidArgument(
                "state_dict",
                f"{arch!r} with these options has {elements} parameters; a payload of {len(payload)} bytes "
                "cannot hold them (check hidden)",
            )
        module = factory(n_features, **(options or {}))
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InvalidArgument("state_dict", f"does not match {arch!r}: missing {missing}, unexpected {unexpected}")
        module.to(device).eval()
        return module, module
    except InvalidArgument:
        raise
    except Exception as exc:
        raise InvalidArgument("model", f"cannot load a {fmt.value} model: {type(exc).__name__}: {exc}") from None


#: Rows of the synthetic part of the warm-up batch (standard normal, fixed seed), so a model is probed
#: beyond the few reference rows: a logit head shows values outside [0, 1] on some of them.
WARMUP_PROBE_ROWS = 64


def _readable(exc: Exception) -> str:
    """The last line of an exception's message: a TorchScript error ends with the Python-level cause,
    after a long interpreter traceback that helps nobody registering a model."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def check_output(mv: ModelVersion, features: list[str], warmup: torch.Tensor | None, device: torch.device) -> None:
    """Run the warm-up batch and check the output contract: one probability in [0, 1] per row.

    The batch is the given rows (reference rows) plus :data:`WARMUP_PROBE_ROWS` standard-normal rows.
    Refusals are FAILED_PRECONDITION naming the rule broken: ``input width`` (the model does not take one
    column per feature), ``one score per row``, ``finite scores``, ``scores are probabilities``.
    """
    n = len(features)
    shown = ", ".join(features[:20]) + (", ..." if n > 20 else "")
    who = f"model {mv.name}:{mv.version}"
    if warmup is not None and (warmup.ndim != 2 or warmup.shape[1] != n):
        raise InvalidArgument("warmup", f"must have shape (rows, {n})")
    probe = torch.randn(WARMUP_PROBE_ROWS, n, generator=torch.Generator().manual_seed(0))
    batch = probe if warmup is None else torch.cat([warmup.to(torch.float32).cpu(), probe])
    try:
        with torch.inference_mode():
            out = mv.module(batch.to(device, torch.float32))
    except Exception as exc:
        raise FailedPrecondition(
            f"{who} failed its warm-up batch (rule: input width): it must take (rows, {n}) float32, one column "
            f"per feature ({shown}); {_readable(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise FailedPrecondition(
            f"{who}: warm-up output is a {type(out).__name__}, not a tensor (rule: one score per row)"
        )
    if out.numel() != batch.shape[0] or out.shape[0] != batch.shape[0]:
        raise FailedPrecondition(
            f"{who}: warm-up gave output of shape {tuple(out.shape)} for {batch.shape[0]} rows; expected "
            f"({batch.shape[0]},) or ({batch.shape[0]}, 1) (rule: one score per row)"
        )
    scores = out.reshape(-1).float()
    if not torch.isfinite(scores).all():
        raise FailedPrecondition(
            f"{who}: warm-up gave NaN/Inf scores; expected one finite score per row (rule: finite scores)"
        )
    low, high = float(scores.min()), float(scores.max())
    if low < 0.0 or high > 1.0:
        raise FailedPrecondition(
            f"{who}: warm-up scores range over [{low:.4g}, {high:.4g}]; scores must be probabilities in [0, 1] "
            "(rule: scores are probabilities). A model that ends in logits needs a sigmoid as its last layer"
        )


#: Called with every model's (active version, activation history) as a change will leave them.
CommitActive = Callable[[dict[str, tuple[str, list[str]]]], None]


class ModelRegistry:
    """Thread-safe registry of model lines; scoring reads the active version without locking."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lines: dict[str, ModelLine] = {}
        self.lock = threading.Lock()

    def register(
        self,
        name: str,
        version: str,
        features: list[str],
        fmt: ModelFormat,
        payload: bytes,
        *,
        arch: str = "",
        options: dict[str, object] | None = None,
        warmup: torch.Tensor | None = None,
    ) -> ModelVersion:
        """Load and warm up a version. A bad version is refused; the active one is never touched."""
        if not name:
            raise InvalidArgument("name", "must not be empty")
        if not version:
            raise InvalidArgument("version", "must not be empty")
        if not features or len(set(features)) != len(features):
            raise InvalidArgument("features", "must be a non-empty list of unique names")
        with self.lock:
            if version in self.lines.get(name, ModelLine()).versions:
                raise AlreadyExists(f"model {name!r} version {version!r} exists")
        module, raw = load_module(fmt, payload, self.device, arch=arch, n_features=len(features), options=options)
        mv = ModelVersion(name, version, tuple(features), module, fmt, time.time(), raw)
        check_output(mv, features, warmup, self.device)
        with self.lock:
            line = self.lines.setdefault(name, ModelLine())
            if version in line.versions:
                raise AlreadyExists(f"model {name!r} version {version!r} exists")
            line.versions[version] = mv
        return mv

    def activate(self, name: str, version: str, commit: CommitActive | None = None) -> ModelVersion:
        """Make ``version`` the one that serves; the previous one is remembered for rollback.

        ``commit`` (e.g. a durable write) gets every model's (active, history) as they will be and runs
        before anything changes; if it raises, nothing changes.
        """
        with self.lock:
            line = self.lines.get(name)
            if line is None or version not in line.versions:
                raise NotFound(f"model {name!r} version {version!r} not found")
            if line.active != version:
                history = line.history + ([line.active] if line.active is not None else [])
                self._commit(commit, name, version, history)
                line.active, line.history = version, history
            return line.versions[version]

    def rollback(self, name: str, commit: CommitActive | None = None) -> ModelVersion:
        """Re-activate the previously active version (``commit`` as in :meth:`activate`)."""
        with self.lock:
            line = self.lines.get(name)
            if line is None:
                raise NotFound(f"model {name!r} not found")
            if not line.history:
                raise FailedPrecondition(f"model {name!r} has no earlier active version to roll back to")
            history = line.history[:-1]
            self._commit(commit, name, line.history[-1], history)
            line.active, line.history = line.history[-1], history
            return line.versions[line.active]

    def _commit(self, commit: CommitActive | None, name: str, active: str, history: list[str]) -> None:
        if commit is not None:  # under self.lock: no other change can come between the plan and the write
            planned = {n: (line.active, list(line.history)) for n, line in self.lines.items() if line.active}
            planned[name] = (active, list(history))
            commit(planned)

    def active(self, name: str, version: str = "") -> ModelVersion:
        """The active version (or a named one)."""
        line = self.lines.get(name)
        if line is None:
            raise NotFound(f"model {name!r} not found")
        chosen = version or line.active
        if chosen is None:
            raise FailedPrecondition(f"model {name!r} has no active version")
        mv = line.versions.get(chosen)
        if mv is None:
            raise NotFound(f"model {name!r} version {chosen!r} not found")
        return mv

    def remove(self, name: str, version: str) -> None:
        """Forget a version that never served (neither active nor in the history); a line left empty goes."""
        with self.lock:
            line = self.lines.get(name)
            if line is None or version not in line.versions:
                return
            if line.active == version or version in line.history:
                raise FailedPrecondition(f"model {name!r} version {version!r} has served; it cannot be removed")
            del line.versions[version]
            if not line.versions:
                del self.lines[name]

    def active_name(self, name: str) -> str | None:
        """The active version's name (None when none is active or the model is unknown)."""
        line = self.lines.get(name)
        return line.active if line is not None else None

    def restore_active(self, name: str, version: str, history: list[str]) -> None:
        """Set a recorded active version and history (at restart); NotFound if any of them is not loaded."""
        with self.lock:
            line = self.lines.get(name)
            known = set(line.versions) if line is not None else set()
            lost = [v for v in (version, *history) if v not in known]
            if line is None or lost:
                raise NotFound(f"model {name!r}: recorded versions {lost} are not loaded")
            line.active, line.history = version, list(history)

    def list(self) -> list[tuple[str, list[str], str | None]]:
        """(name, versions, active) per model line."""
        with self.lock:
            return [(n, list(line.versions), line.active) for n, line in sorted(self.lines.items())]
