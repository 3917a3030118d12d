"""STAND-IN for a Kubernetes API server: kmock's KubernetesEmulator on a real HTTP port, for tests only.

No Kubernetes API server can be started on these machines, so the extender's and the controller's calls
(through the official ``kubernetes`` client) go to kmock's emulator: an in-memory store of objects served
over HTTP with Kubernetes' URL layout (create, get, list, patch, delete, watch). It is kept thin, like the
Consul double, and it is NOT a Kubernetes API server. Known gaps, so that no test asserts them:

* creating a Binding stores a ``bindings`` object but does NOT set the pod's ``spec.nodeName``;
* the Eviction subresource is answered here with a Success status and recorded in ``evictions`` (or refused
  with 429 while ``refuse_evictions`` is set, as a real server refuses one a PodDisruptionBudget forbids);
  the pod is NOT deleted (a real server deletes it after an accepted eviction);
* no admission, no validation, no resourceVersion conflicts, no garbage collection, no kubelet (pods keep
  whatever ``status`` a test writes).
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any

import attrs
from kmock import KubernetesEmulator, KubernetesError, ResourceInfo, Server
from kubernetes import client


@attrs.frozen
class _BudgetRefusal(KubernetesError):
    """What a real server answers an eviction a PodDisruptionBudget forbids (rendered as a 429 Status)."""

    status: int = 429
    reason: str = "TooManyRequests"
    message: str = "Cannot evict pod as it would violate the pod's disruption budget."


class KubeEmulator:
    """kmock's emulator served from a background event loop; ``api_client()`` talks to it."""

    def __init__(self) -> None:
        self.url = ""
        #: (namespace, pod name) of every eviction asked for, in order.
        self.evictions: list[tuple[str, str]] = []
        #: While set, evictions are refused with 429 as a PodDisruptionBudget makes a real server refuse them.
        self.refuse_evictions = False
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._error: BaseException | None = None
        #: The emulator (its ``objects`` hold what was created, bindings included).
        self.kube: Any = None

    def _evict(self, request: Any) -> Any:
        parts = str(request.url.path).strip("/").split("/")  # api/v1/namespaces/<ns>/pods/<name>/eviction
        if self.refuse_evictions:
            raise _BudgetRefusal()
        self.evictions.append((parts[3], parts[5]))
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            self._stop = asyncio.Event()
            async with KubernetesEmulator() as kube, Server(kube) as server:
                self.kube = kube
                for plural in ("pods", "nodes", "events", "bindings"):  # listable before their first object
                    kube.resources[f"v1/{plural}"] = ResourceInfo()
                kube[lambda r: r.method == "POST" and str(r.url.path).endswith("/eviction")] << self._evict
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def __enter__(self) -> KubeEmulator:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError(f"kube emulator did not start: {self._error!r}")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def api_client(self) -> client.ApiClient:
        """An official-client ApiClient pointed at the emulator."""
        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)
