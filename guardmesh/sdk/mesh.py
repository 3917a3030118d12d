"""One object for the whole mesh: lazily created clients that share one configuration, and the trainer loop.

::

    from guardmesh.sdk import Mesh

    with Mesh() as mesh:                                  # load_config(): GUARDMESH_CONFIG, env overrides
        mesh.scheduler.describe("resnet-42")
        ps = mesh.paramserver("resnet-42", worker_id="worker-0")
        mesh.scorer.score("fraud", {"amount": 12.0})
        mesh.abrouter.assign_one("user-1", "checkout")
    # every channel is closed here

:func:`train_loop` trains a module through the parameter server while a scheduler :class:`Lease` is held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from guardmesh.config import MeshConfig, load_config
from guardmesh.sdk.abrouter import ABRouterClient
from guardmesh.sdk.paramserver import ParamServerClient, StepReport
from guardmesh.sdk.scheduler import Lease, SchedulerClient
from guardmesh.sdk.scorer import ScorerClient
from guardmesh.tracing import setup_tracing

if TYPE_CHECKING:
    import torch

C = TypeVar("C")
B = TypeVar("B")


class Mesh:
    """The mesh's clients behind one configuration; each is created on first use and closed by :meth:`close`.

    ``config`` defaults to :func:`guardmesh.config.load_config`. ``addresses`` overrides discovery per
    service: ``{"scheduler": "10.0.0.5:50061", "paramserver": ["10.0.0.6:50062", "10.0.0.6:50063"]}``
    (a list gives every paramserver shard; otherwise shards come from the configuration).

    Tracing is set up from the standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``tracing.otlp_endpoint``,
    ``OTEL_TRACES_EXPORTER`` including ``console``, ``OTEL_SERVICE_NAME``), unless the application set up
    OpenTelemetry itself first: each call is a CLIENT span, the root of its trace unless the application has a
    span open, and the services' spans are its children.
    """

    def __init__(
        self, config: MeshConfig | None = None, *, addresses: Mapping[str, str | Sequence[str]] | None = None
    ) -> None:
        self.config = config or load_config()
        setup_tracing(otlp_endpoint=self.config.tracing.otlp_endpoint)
        self.addresses = dict(addresses or {})
        self._lock = threading.Lock()
        self._clients: dict[str, object] = {}
        self._paramservers: dict[tuple[str, str], ParamServerClient] = {}
        self._closed = False

    def _address(self, service: str) -> str | None:
        value = self.addresses.get(service)
        if value is None:
            return None
        if isinstance(value, str):
            return value
        raise ValueError(f"addresses[{service!r}]: one address expected, got {list(value)}")

    def _get(self, name: str, factory: Callable[[MeshConfig, str | None], C]) -> C:
        with self._lock:
            if self._closed:
                raise RuntimeError("the Mesh is closed")
            client = self._clients.get(name)
            if client is None:
                client = factory(self.config, self._address(name))
                self._clients[name] = client
            return client  # type: ignore[return-value]

    @property
    def scheduler(self) -> SchedulerClient:
        """The scheduler client (created on first use)."""
        return self._get("scheduler", lambda c, a: SchedulerClient(c, address=a))

    @property
    def scorer(self) -> ScorerClient:
        """The scorer client (created on first use)."""
        return self._get("scorer", lambda c, a: ScorerClient(c, address=a))

    @property
    def abrouter(self) -> ABRouterClient:
        """The A/B router client (created on first use)."""
        return self._get("abrouter", lambda c, a: ABRouterClient(c, address=a))

    def paramserver(self, model: str, *, worker_id: str = "worker-0") -> ParamServerClient:
        """The parameter-server client of ``model`` for ``worker_id`` over every shard (one per pair)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the Mesh is closed")
            key = (model, worker_id)
            client = self._paramservers.get(key)
            if client is None:
                value = self.addresses.get("paramserver")
                addresses = [value] if isinstance(value, str) else (list(value) if value is not None else None)
                client = ParamServerClient.connect(model, worker_id=worker_id, config=self.config, addresses=addresses)
                self._paramservers[key] = client
            return client

    def close(self) -> None:
        """Close every client created so far; the Mesh cannot be used afterwards."""
        with self._lock:
            self._closed = True
            clients = [*self._clients.values(), *self._paramservers.values()]
            self._clients.clear()
            self._paramservers.clear()
        for client in clients:
            client.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Mesh:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass
class TrainSummary:
    """What :func:`train_loop` did."""

    #: Steps pushed.
    steps: int = 0
    #: Re-pulls after stale pushes, over every step.
    repulls: int = 0
    #: Loss of every step, in order.
    losses: list[float] = field(default_factory=list)
    #: True when the loop stopped early on a preemption notice of the lease.
    preempted: bool = False


def train_loop(
    ps: ParamServerClient,
    module: torch.nn.Module,
    batches: Iterable[B],
    loss_of: Callable[[B], torch.Tensor],
    *,
    epochs: int = 1,
    lease: Lease | None = None,
    on_step: Callable[[int, StepReport], None] | None = None,
    fused: bool = False,
) -> TrainSummary:
    """Train ``module`` through the parameter server: one :meth:`ParamServerClient.train_step` per batch.

    ``loss_of(batch)`` runs the forward pass and returns the loss tensor; the loop calls ``backward()``.
    Each step pulls the parameters into the module, pushes its gradients and re-pulls and recomputes when
    the push was stale. ``batches`` is iterated once per epoch (a list or a ``DataLoader``). With a
    ``lease``, :meth:`Lease.should_stop` is asked before every step: a preemption notice ends the loop
    (``preempted`` is set: checkpoint and exit), a lost lease raises its :class:`grpc.RpcError`.
    ``on_step(step, report)`` is called after every step. ``fused`` makes each step one PushPull round trip
    (see :meth:`ParamServerClient.train_step`). At the end the module holds the server's
    latest parameters. Errors of the parameter server propagate as :class:`grpc.RpcError` (or
    :class:`~guardmesh.sdk.paramserver.StalePush` after too many re-pulls).
    """
    summary = TrainSummary()
    for _ in range(epochs):
        for batch in batches:
            if lease is not None and lease.should_stop():
                summary.preempted = True
                break

            def compute(batch: B = batch) -> float:
                loss = loss_of(batch)
                loss.backward()
                return float(loss.item())

            report = ps.train_step(module, compute, fused=fused)
            summary.steps += 1
            summary.repulls += report.repulls
            summary.losses.append(float(report.loss))  # type: ignore[arg-type]
            if on_step is not None:
                on_step(summary.steps, report)
        if summary.preempted:
            break
    ps.pull_into(module)
    return summary
