"""NVIDIA Triton Inference Server as the scorer benchmark's peer: a real ``tritonserver`` (the binary that
PyPI's ``nvidia-pytriton`` ships, ``pip install '.[bench]'``) serving the same TorchScript module through its
Python backend on CPU, with or without Triton's dynamic batcher.

:func:`triton_process` writes a model repository (``config.pbtxt``, ``1/model.py``, ``1/model.pt``, the
backend stub for this interpreter's Python version), starts ``tritonserver`` on free loopback ports and yields
its gRPC address once ``ServerReady`` and ``ModelReady`` say so. The Python backend's stub links the system
libpython, so ``LD_LIBRARY_PATH`` is set to the directory of this interpreter's own libpython, and
the model's ``model.py`` puts this environment's site-packages first on its path so the stub imports the same torch.

The model takes ``features`` (FP32, one row of the model's features per batch item) and answers ``score``
(FP32, one per row): the same tensors as guardmesh's ModelInfer, so one request body serves both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.processes import clean_env, free_port, start, stop
from inference import grpc_predict_v2_pb2 as oip_pb
from inference import grpc_predict_v2_pb2_grpc as oip_grpc

#: The model's Python backend: one forward per ``execute`` call, whatever number of requests Triton hands it
#: (one without dynamic batching, a whole batch with it).
MODEL_PY = """\
import os
import sys

sys.path[:0] = SITE_PACKAGES  # the stub's interpreter is the system one: import this environment's torch

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        threads = int(os.environ.get("BENCH_TORCH_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        here = os.path.join(args["model_repository"], args["model_version"])
        self.module = torch.jit.load(os.path.join(here, "model.pt")).eval()

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "features").as_numpy() for r in requests]
        x = torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        with torch.inference_mode():
            scores = self.module(x).reshape(x.shape[0], -1)[:, :1].float()
        answers, start = [], 0
        for a in arrays:
            n = a.shape[0]
            # Through DLPack: a numpy output (numpy 2) reaches the client as zero bytes with this stub.
            part = torch.utils.dlpack.to_dlpack(scores[start : start + n].clone())
            out = pb_utils.Tensor.from_dlpack("score", part)
            answers.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += n
        return answers
"""


def tritonserver_home() -> Path:
    """The folder of nvidia-pytriton's ``tritonserver`` (bin/, backends/, python_backend_stubs/); found
    without importing pytriton (its client needs packages this benchmark does not)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: pip install '.[bench]' (it ships tritonserver)")
    home = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (home / "bin" / "tritonserver").exists():
        raise RuntimeError(f"no tritonserver binary under {home}")
    return home


def write_repository(
    root: Path,
    name: str,
    torchscript: bytes,
    n_features: int,
    *,
    dynamic_batching: bool,
    max_batch_size: int,
    max_queue_delay_us: int,
) -> None:
    """Model ``name`` under ``root``: the TorchScript module behind the Python backend; the same
    ``max_batch_size`` either way, Triton's dynamic batcher only with ``dynamic_batching``."""
    model = root / name
    version = model / "1"
    version.mkdir(parents=True)
    (version / "model.pt").write_bytes(torchscript)
    (version / "model.py").write_text(MODEL_PY.replace("SITE_PACKAGES", repr(site.getsitepackages())))
    batching = (
        f"dynamic_batching {{ preferred_batch_size: [ {max_batch_size} ] "
        f"max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        if dynamic_batching
        else ""
    )
    (model / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f'input [ {{ name: "features" data_type: TYPE_FP32 dims: [ {n_features} ] }} ]\n'
        f'output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }} ]\n'
        f"instance_group [ {{ kind: KIND_CPU count: 1 }} ]\n{batching}"
    )


def backend_directory(root: Path) -> Path:
    """A backends folder under ``root`` whose Python backend carries the stub built for this interpreter's
    Python version (Triton looks for the stub only beside ``libtriton_python.so``)."""
    home = tritonserver_home()
    python = root / "python"
    python.mkdir(parents=True)
    for item in (home / "backends" / "python").iterdir():
        if item.is_file():
            (python / item.name).symlink_to(item)
    stub = home / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    (python / stub.name).symlink_to(stub)
    return root


def wait_ready(address: str, models: list[str], proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll ServerReady and every model's ModelReady until true; RuntimeError with the log's tail otherwise."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {proc.returncode}: {log.read_text()[:6000]}")
            try:
                if stub.ServerReady(oip_pb.ServerReadyRequest(), timeout=1.0).ready and all(
                    stub.ModelReady(oip_pb.ModelReadyRequest(name=m), timeout=1.0).ready for m in models
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"tritonserver not ready within {timeout:.0f} s: {log.read_text()[:6000]}")


@contextlib.contextmanager
def triton_process(
    models: dict[str, tuple[bytes, int, bool]],
    *,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    torch_threads: int = 0,
    timeout: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve ``models`` (name -> (TorchScript bytes, feature count, dynamic batching on?)) from one
    tritonserver; yield (gRPC address, process) once every model is ready; stop it afterwards."""
    home = tritonserver_home()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    with tempfile.TemporaryDirectory(prefix="guardmesh-bench-triton-") as tmp:
        repo = Path(tmp) / "models"
        for name, (payload, n_features, batched) in models.items():
            write_repository(
                repo,
                name,
                payload,
                n_features,
                dynamic_batching=batched,
                max_batch_size=max_batch_size,
                max_queue_delay_us=max_queue_delay_us,
            )
        port = free_port()
        env = clean_env(tmp)
        env["LD_LIBRARY_PATH"] = libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        env["BENCH_TORCH_THREADS"] = str(torch_threads)
        cmd = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={backend_directory(Path(tmp) / 'backends')}",
            f"--grpc-port={port}",
            "--grpc-address=127.0.0.1",
            "--allow-http=false",
            "--allow-metrics=false",
            "--log-verbose=0",
        ]
        log = Path(tmp) / "triton.log"
        proc = start(cmd, env, log)
        try:
            wait_ready(f"127.0.0.1:{port}", list(models), proc, log, timeout)
            yield f"127.0.0.1:{port}", proc
        finally:
            stop(proc)
