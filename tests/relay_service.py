"""A second, real guardmesh service process for the tracing test: ``python tests/relay_service.py``.

It runs through the same runtime as every service (``guardmesh.runtime.start_service``) under the service name
"relay", so its spans carry ``service.name=relay``. Its one method, ``/guardmesh.test.Relay/Forward`` (raw
bytes in and out), calls ``SchedulerService.ListNodes`` through ``guardmesh.client.open_channel("scheduler")``
(address from the mesh config, e.g. ``GUARDMESH__SERVICES__SCHEDULER__PORT``) and answers the node count as
ASCII digits. It prints ``PORT <n>`` on stdout once serving, and on SIGTERM/SIGINT drains the service and
shuts tracing down (flushing spans) before exiting 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import grpc

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig, load_config
from guardmesh.logs import setup_logging
from guardmesh.runtime import ServiceDefinition, start_service
from guardmesh.tracing import shutdown_tracing
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc

SERVICE_NAME = "guardmesh.test.Relay"
METHOD = f"/{SERVICE_NAME}/Forward"


def _identity(data: bytes) -> bytes:
    return data


class RelayBinding:
    """The relay's generic handler; no state of its own."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config

    def _forward(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        channel = open_channel("scheduler", self.config)
        try:
            reply = spb_grpc.SchedulerServiceStub(channel).ListNodes(spb.ListNodesRequest())
        finally:
            channel.close()
        return str(len(reply.nodes)).encode()

    def add_to_server(self, server: grpc.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Forward": grpc.unary_unary_rpc_method_handler(
                    self._forward, request_deserializer=_identity, response_serializer=_identity
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))

    def start(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


DEFINITION = ServiceDefinition(name="relay", service_names=(SERVICE_NAME,), build=RelayBinding)


def main() -> int:
    config = load_config()
    setup_logging("relay", config.logging.level, config.logging.format)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running = start_service(DEFINITION, config, port=0)
    print(f"PORT {running.port}", flush=True)
    while not stop.wait(0.2):
        pass
    running.stop()
    shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
