"""Server reflection, v1 and v1alpha, serving the contracts with their comments.

grpcurl and other clients try ``grpc.reflection.v1`` first and fall back to ``v1alpha``; grpcio-reflection
serves only ``v1alpha``. Both versions have the same messages field for field, so one servicer answers both.
It answers with the descriptors that ``tools/protogen.py`` wrote with their source info
(``guardmesh/v1/descriptors.binpb``), so ``grpcurl describe`` shows each documented field and method; files
not in that set (health, reflection itself) come from the process's descriptor pool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as rpb

log = logging.getLogger(__name__)

#: Written by tools/protogen.py: every guardmesh and inference proto with imports and comments.
DESCRIPTOR_SET = Path(__file__).resolve().parent / "v1" / "descriptors.binpb"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``: v1alpha's file under the v1 package (the messages are the same)."""
    proto = descriptor_pb2.FileDescriptorProto()
    rpb.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for fld in message.field:
            if fld.type_name.startswith(".grpc.reflection.v1alpha."):
                fld.type_name = fld.type_name.replace(".v1alpha.", ".v1.", 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.", 1)
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.", 1)
    proto.options.Clear()
    return proto


def _documented_files(path: Path = DESCRIPTOR_SET) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    try:
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    except OSError as exc:  # a build without the set still reflects, without comments
        log.warning("reflection without comments: no descriptor set", extra={"path": str(path), "error": str(exc)})
    else:
        files = {f.name: f for f in descriptor_set.file}
    v1 = _v1_file()
    files[v1.name] = v1
    return files


class DocumentedReflection(reflection.ReflectionServicer):
    """The reflection servicer answering with the documented descriptors where it has them."""

    def __init__(self, service_names: Iterable[str]) -> None:
        super().__init__([*service_names, reflection.SERVICE_NAME, V1_SERVICE])
        self._files = _documented_files()
        self._pool = descriptor_pool.Default()

    def _file_proto(self, name: str) -> descriptor_pb2.FileDescriptorProto | None:
        if name in self._files:
            return self._files[name]
        try:
            found = self._pool.FindFileByName(name)
        except KeyError:
            return None
        proto = descriptor_pb2.FileDescriptorProto()
        found.CopyToProto(proto)
        return proto

    def _answer(self, request: rpb.ServerReflectionRequest, name: str) -> rpb.ServerReflectionResponse:
        """The file ``name`` and every file it imports, transitively."""
        ordered: list[descriptor_pb2.FileDescriptorProto] = []
        seen: set[str] = set()
        pending = [name]
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            proto = self._file_proto(current)
            if proto is None:
                return reflection._base._not_found_error(request)  # type: ignore[attr-defined,no-any-return]
            ordered.append(proto)
            pending.extend(proto.dependency)
        return rpb.ServerReflectionResponse(
            file_descriptor_response=rpb.FileDescriptorResponse(
                file_descriptor_proto=[p.SerializeToString() for p in ordered]
            ),
            original_request=request,
        )

    def _file_by_filename(self, request: rpb.ServerReflectionRequest, filename: str) -> rpb.ServerReflectionResponse:
        return self._answer(request, filename)

    def _file_containing_symbol(
        self, request: rpb.ServerReflectionRequest, fully_qualified_name: str
    ) -> rpb.ServerReflectionResponse:
        if fully_qualified_name.startswith("grpc.reflection.v1."):
            return self._answer(request, V1_FILE)
        try:
            name = self._pool.FindFileContainingSymbol(fully_qualified_name).name
        except KeyError:
            return reflection._base._not_found_error(request)  # type: ignore[attr-defined,no-any-return]
        return self._answer(request, name)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server`` for ``service_names`` (and the reflection services)."""
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    servicer = DocumentedReflection(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=rpb.ServerReflectionRequest.FromString,
        response_serializer=rpb.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1}),))
