"""Checkpoints of a model shard: safetensors files written atomically to several replica locations.

Each checkpoint is ``v<version>.safetensors`` (tensors, optimizer state and a JSON metadata string) plus a
manifest ``v<version>.json`` holding its SHA-256 and size, written after the data so that a manifest
always describes a complete file. Locations are local directories or any fsspec URL (``s3://...``,
``gs://...`` with the ``cloud`` extra). On restore the newest checkpoint whose checksum verifies wins; a
corrupt, partial or unreachable replica is skipped and reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Not enough replicas could be written."""


@dataclass
class Restored:
    """A verified checkpoint read back."""

    version: int
    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]
    location: str
    skipped: list[str] = field(default_factory=list)


def _name(version: int) -> str:
    return f"v{version:012d}"


class CheckpointStore:
    """Replica locations for one shard; each model lives in ``<location>/<model>/``."""

    def __init__(self, locations: list[str], min_replicas: int, keep: int = 3) -> None:
        if not locations:
            raise ValueError("at least one checkpoint location is needed")
        self.locations = locations
        self.min_replicas = min(min_replicas, len(locations))
        self.keep = keep

    def save(
        self, model: str, version: int, arrays: dict[str, np.ndarray], metadata: dict[str, Any]
    ) -> tuple[str, list[str]]:
        """Write to every location; return (sha256, locations written). CheckpointError below the minimum."""
        payload = st_save(arrays, metadata={"guardmesh": json.dumps(metadata)})
        digest = hashlib.sha256(payload).hexdigest()
        manifest = json.dumps({"version": version, "sha256": digest, "bytes": len(payload)}).encode()
        written, failures = [], []
        for loc in self.locations:
            try:
                fs, root = fsspec.core.url_to_fs(loc)
                folder = f"{root}/{model}"
                fs.makedirs(folder, exist_ok=True)
                self._atomic_write(fs, f"{folder}/{_name(version)}.safetensors", payload)
                self._atomic_write(fs, f"{folder}/{_name(version)}.json", manifest)
                self._prune(fs, folder)
                written.append(loc)
            except Exception as exc:
                failures.append(f"{loc}: {type(exc).__name__}: {exc}")
                log.warning("checkpoint replica failed", extra={"location": loc, "error": str(exc)})
        if len(written) < self.min_replicas:
            raise CheckpointError(
                f"checkpoint v{version} of {model} reached {len(written)} of the required {self.min_replicas} "
                f"replicas: {'; '.join(failures)}"
            )
        return digest, written

    @staticmethod
    def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if hasattr(fh, "fileno"):
                with contextlib.suppress(OSError, ValueError, NotImplementedError, AttributeError):
                    os.fsync(fh.fileno())
        fs.mv(tmp, path)

    def _prune(self, fs: fsspec.AbstractFileSystem, folder: str) -> None:
        manifests = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
        for old in manifests[: -self.keep]:
            stem = old[: -len(".json")]
            for path in (old, f"{stem}.safetensors"):
                if fs.exists(path):
                    fs.rm(path)

    def models(self) -> list[str]:
        """Models with at least one manifest in any reachable location."""
        found: set[str] = set()
        for loc in self.locations:
            try:
                fs, root = fsspec.core.url_to_fs(loc)
                if not fs.exists(root):
                    continue
                for entry in fs.ls(root, detail=True):
                    if entry["type"] == "directory":
                        found.add(entry["name"].rstrip("/").rsplit("/", 1)[-1])
            except Exception:
                continue
        return sorted(found)

    def restore(self, model: str) -> Restored | None:
        """The newest checkpoint of ``model`` whose checksum verifies, with what was skipped on the way."""
        candidates: list[tuple[int, str, str, dict[str, Any]]] = []
        skipped: list[str] = []
        for loc in self.locations:
            try:
                fs, root = fsspec.core.url_to_fs(loc)
                folder = f"{root}/{model}"
                if not fs.isdir(root):
                    skipped.append(f"{loc}: unreachable (no replica folder at {root})")
                    continue
                if not fs.isdir(folder):
                    skipped.append(f"{loc}: holds no checkpoint of {model}")
                    continue
                for path in fs.ls(folder, detail=False):
                    if path.endswith(".json"):
                        try:
                            manifest = json.loads(fs.cat_file(path))
                            candidates.append((int(manifest["version"]), loc, path[: -len(".json")], manifest))
                        except (ValueError, KeyError) as exc:
                            skipped.append(f"{loc}: unreadable manifest {path} ({exc})")
            except Exception as exc:
                skipped.append(f"{loc}: unreachable ({type(exc).__name__}: {exc})")
        for version, loc, stem, manifest in sorted(candidates, key=lambda c: -c[0]):
            fs, _ = fsspec.core.url_to_fs(loc)
            try:
                data = fs.cat_file(f"{stem}.safetensors")
            except Exception as exc:
                skipped.append(f"{loc}: v{version} unreadable ({type(exc).__name__})")
                continue
            if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
                skipped.append(f"{loc}: v{version} corrupt or partial (checksum mismatch)")
                continue
            arrays = st_load(data)

            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            metadata = json.loads(header.get("__metadata__", {}).get("guardmesh", "{}"))
            for s in skipped:
                log.warning("checkpoint replica skipped", extra={"model": model, "detail": s})
            return Restored(version, arrays, metadata, loc, skipped)
        for s in skipped:
            log.warning("checkpoint replica skipped", extra={"model": model, "detail": s})
        return None
