"""The project's layering, read from the import statements: nothing in guardmesh/ imports services/, and the demo
talks to the mesh only through the SDK."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

#: (file, module) imports of services/ still allowed, each with its reason.
ALLOWED: set[tuple[str, str]] = set()


def _imports(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names (``from a.b import c``: ``a.b`` and ``a.b.c``)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return found


def test_guardmesh_imports_no_service() -> None:
    files = sorted((REPO / "guardmesh").glob("*.py")) + sorted((REPO / "guardmesh" / "sdk").glob("*.py"))
    assert len(files) > 10

    def allowed(file: str, module: str) -> bool:
        return any(file == f and (module == m or module.startswith(f"{m}.")) for f, m in ALLOWED)

    offending = [
        (str(f.relative_to(REPO)), module)
        for f in files
        for module in _imports(f)
        if (module == "services" or module.startswith("services.")) and not allowed(str(f.relative_to(REPO)), module)
    ]
    assert not offending


def test_the_demo_uses_the_sdk_not_raw_stubs() -> None:
    for name in ("demo.py", "demo_worker.py"):
        modules = _imports(REPO / "guardmesh" / name)
        assert not [m for m in modules if m.endswith("_pb2_grpc") or m.startswith("guardmesh.client")], name
        assert any(m.startswith("guardmesh.sdk") for m in modules), name
