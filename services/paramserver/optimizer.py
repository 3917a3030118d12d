"""Server-side optimizers over flat float32 masters, stepping through the native fused kernels.

The optimizer's step counter counts *applied* updates only, so a rejected or retried push never skews
Adam's bias correction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from guardmesh.errors import InvalidArgument
from native import optim as _optim  # type: ignore[attr-defined]
from services.paramserver.gradients import Gradient, Segments


class OptimizerKind(IntEnum):
    """Numbers match ``guardmesh.v1.OptimizerKind``."""

    SGD = 1
    MOMENTUM = 2
    ADAM = 3
    ADAMW = 4


@dataclass(frozen=True)
class OptimizerSettings:
    """Validated optimizer settings (defaults filled in)."""

    kind: OptimizerKind
    learning_rate: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 0.0

    def validate(self) -> None:
        """Raise InvalidArgument naming the first field that breaks its rule."""
        finite = np.isfinite
        if not (finite(self.learning_rate) and self.learning_rate > 0):
            raise InvalidArgument("optimizer.learning_rate", "must be > 0 and finite")
        if not 0 <= self.momentum < 1:
            raise InvalidArgument("optimizer.momentum", "must be 0 to < 1")
        if not 0 <= self.dampening <= 1:
            raise InvalidArgument("optimizer.dampening", "must be 0 to 1")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise InvalidArgument("optimizer.nesterov", "needs momentum > 0 and dampening = 0")
        if not 0 <= self.beta1 < 1:
            raise InvalidArgument("optimizer.beta1", "must be 0 to < 1")
        if not 0 <= self.beta2 < 1:
            raise InvalidArgument("optimizer.beta2", "must be 0 to < 1")
        if not (finite(self.epsilon) and self.epsilon > 0):
            raise InvalidArgument("optimizer.epsilon", "must be > 0")
        if not (finite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidArgument("optimizer.weight_decay", "must be >= 0 and finite")
        if not (finite(self.clip_norm) and self.clip_norm >= 0):
            raise InvalidArgument("optimizer.clip_norm", "must be >= 0 and finite")


class ServerOptimizer:
    """Optimizer state for a set of named masters; ``step`` applies one aggregated update."""

    def __init__(self, settings: OptimizerSettings, masters: dict[str, np.ndarray]) -> None:
        self.settings = settings
        self.steps = 0
        #: Updates applied to each tensor (like torch's per-parameter ``step``): a push may cover a subset.
        self.tensor_steps: dict[str, int] = dict.fromkeys(masters, 0)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        for name, p in masters.items():
            if settings.kind == OptimizerKind.MOMENTUM:
                self.state[name] = {"momentum_buffer": np.zeros_like(p)}
            elif settings.kind in (OptimizerKind.ADAM, OptimizerKind.ADAMW):
                self.state[name] = {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
            else:
                self.state[name] = {}

    def step(
        self, masters: dict[str, np.ndarray], grads: Mapping[str, Gradient], lr_scale: float, grad_scale: float
    ) -> None:
        """Apply one update: ``grads`` are already aggregated; ``grad_scale`` carries clipping.

        A gradient in :class:`Segments` is applied segment by segment to the matching slices of the
        parameter and its state (the kernels are elementwise: the result is the same as on one array).
        """
        s = self.settings
        self.steps += 1
        lr = s.learning_rate * lr_scale
        for name, g in grads.items():
            p = masters[name]
            st = self.state[name]
            self.tensor_steps[name] += 1
            t = self.tensor_steps[name]
            for lo, gs in g.parts if isinstance(g, Segments) else ((0, g),):
                hi = lo + gs.shape[0]
                if s.kind in (OptimizerKind.ADAM, OptimizerKind.ADAMW):
                    _optim.adam_step(
                        p[lo:hi],
                        gs,
                        st["exp_avg"][lo:hi],
                        st["exp_avg_sq"][lo:hi],
                        t,
                        lr,
                        s.beta1,
                        s.beta2,
                        s.epsilon,
                        s.weight_decay,
                        s.kind == OptimizerKind.ADAMW,
                        grad_scale,
                    )
                    continue
                if grad_scale != 1.0:
                    gs = gs * np.float32(grad_scale)
                if s.kind == OptimizerKind.MOMENTUM:
                    _optim.momentum_step(
                        p[lo:hi],
                        gs,
                        st["momentum_buffer"][lo:hi],
                        lr,
                        s.momentum,
                        s.dampening,
                        s.nesterov,
                        s.weight_decay,
                        t == 1,
                    )
                else:
                    _optim.sgd_step(p[lo:hi], gs, lr, s.weight_decay)
