"""Build steps that pyproject.toml cannot declare: protobuf code generation and the Cython extensions.

``pip install .`` and ``pip install -e .`` both generate ``guardmesh/v1/*_pb2*.py`` from ``protos/`` and
compile every ``native/*.pyx``; no generated or compiled file is committed.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    """Generate the protobuf modules before collecting Python sources."""

    def run(self) -> None:
        """Generate, then build as usual."""
        runpy.run_path(str(ROOT / "tools" / "protogen.py"))["generate"](ROOT)
        super().run()


extensions = [
    Extension(
        f"native.{pyx.stem}",
        [str(pyx.relative_to(ROOT))],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        # OpenMP lets kernels split work across cores with cython.parallel.prange (nogil).
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    for pyx in sorted((ROOT / "native").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
    cmdclass={"build_py": BuildPyWithProtos},
)
