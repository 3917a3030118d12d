"""Generate Python code (messages, gRPC stubs, type stubs) from ``protos/`` into ``guardmesh/v1/``.

Used by ``make proto`` and by the package build (``setup.py``), so both produce the same files. Beside the
code it writes :data:`DESCRIPTOR_SET` (every file with its imports and its comments, ``--include_source_info``):
server reflection serves those, so ``grpcurl describe`` shows the documented contracts.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT
#: The descriptor set with source info, relative to the output root.
DESCRIPTOR_SET = Path("guardmesh/v1/descriptors.binpb")


def generate(root: Path = ROOT) -> list[Path]:
    """Run protoc over every ``.proto`` under ``protos/``; return the generated Python files."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "protos"
    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        f"--descriptor_set_out={root / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
        *[str(p.relative_to(proto_root)) for p in protos],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    generated: list[Path] = []
    for proto in protos:
        rel = proto.relative_to(proto_root).with_suffix("")
        generated += [root / f"{rel}_pb2.py", root / f"{rel}_pb2_grpc.py", root / f"{rel}_pb2.pyi"]
        # Packages for the generated modules (guardmesh/v1/__init__.py is part of the source tree).
    return [*generated, root / DESCRIPTOR_SET]


if __name__ == "__main__":
    files = generate()
    print(f"generated {len(files)} files from {PROTO_ROOT.relative_to(ROOT)}/", file=sys.stderr)
