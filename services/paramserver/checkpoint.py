"""Checkpoints of a model's shards, as consistent cuts: safetensors files written atomically to several
replica locations, and one manifest per cut.

Layout under each replica location (a local directory or any fsspec URL: ``s3://...``, ``gs://...`` with
the ``cloud`` extra)::

    shard-<i>/<model>/v<version>.safetensors   tensors, optimizer state and a JSON metadata string
    shard-<i>/<model>/v<version>.json          its SHA-256 and size, written after the data
    cuts/<model>/v<version>.json               the cut: every shard's file of that version and checksum

A shard checkpoints the versions that are multiples of ``checkpoint_every``, each taken at exactly that
version. After writing its file of version v, a shard looks for the files of v of every shard holding the
model; when all are there it writes the cut manifest (whichever shard finishes last writes it; two that
finish together both write the same manifest, atomically). A file is written before the check, so of two
shards finishing at once at least one sees both files.

Restore takes the newest complete cut whose file of this shard verifies (a version whose every shard file is
there counts, its manifest written then if the writer died before it). The one exception is the final
checkpoint a graceful stop (SIGTERM) writes: when it is this shard's newest file, it is what the next
start restores (nothing acknowledged is lost), and that start marks it used, so a later kill -9 restores
a cut again. A corrupt, partial or unreachable replica is skipped and reported.
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
    """Not enough replicas could be written, or a checkpoint asked for is not there."""


@dataclass
class Restored:
    """A verified checkpoint of this shard read back."""

    version: int
    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]
    location: str
    #: True for this shard's final checkpoint of a graceful stop; False for a complete cut.
    final: bool = False
    skipped: list[str] = field(default_factory=list)


def _name(version: int) -> str:
    return f"v{version:012d}"


def _version(path: str) -> int | None:
    stem = path.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    return int(stem[1:]) if stem.startswith("v") and stem[1:].isdigit() else None


class CheckpointStore:
    """The replica locations of one shard (index ``shard``) and the cuts of its models."""

    def __init__(self, locations: list[str], shard: int, min_replicas: int, keep: int = 3) -> None:
        if not locations:
            raise ValueError("at least one checkpoint location is needed")
        self.locations = locations
        self.shard = shard
        self.min_replicas = min(min_replicas, len(locations))
        self.keep = keep

    @staticmethod
    def _fs(loc: str) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(loc)
        return fs, root.rstrip("/")

    def _folder(self, root: str, model: str, shard: int | None = None) -> str:
        return f"{root}/shard-{self.shard if shard is None else shard}/{model}"

    # -- writing -----------------------------------------------------------------------------------------

    def save(
        self,
        model: str,
        version: int,
        arrays: dict[str, np.ndarray],
        metadata: dict[str, Any],
        cut_shards: list[int],
        *,
        final: bool = False,
    ) -> tuple[str, list[str]]:
        """Write this shard's checkpoint of ``version`` to every location, then the cut's manifest if every
        shard of ``cut_shards`` holds that version. Returns (sha256, locations written); CheckpointError below
        the minimum of replicas."""
        payload = st_save(arrays, metadata={"guardmesh": json.dumps(metadata)})
        digest = hashlib.sha256(payload).hexdigest()
        manifest = json.dumps(
            {"version": version, "sha256": digest, "bytes": len(payload), "final": final, "cut_shards": cut_shards}
        ).encode()
        written, failures = [], []
        for loc in self.locations:
            try:
                fs, root = self._fs(loc)
                folder = self._folder(root, model)
                fs.makedirs(folder, exist_ok=True)
                self._atomic_write(fs, f"{folder}/{_name(version)}.safetensors", payload)
                self._atomic_write(fs, f"{folder}/{_name(version)}.json", manifest)
                written.append(loc)
            except Exception as exc:
                failures.append(f"{loc}: {type(exc).__name__}: {exc}")
                log.warning("checkpoint replica failed", extra={"location": loc, "error": str(exc)})
        if len(written) < self.min_replicas:
            raise CheckpointError(
                f"checkpoint v{version} of {model} reached {len(written)} of the required {self.min_replicas} "
                f"replicas: {'; '.join(failures)}"
            )
        self.complete_cut(model, version, cut_shards)
        for loc in written:
            with contextlib.suppress(Exception):  # pruning is housekeeping: a failure keeps files, loses nothing
                self._prune(loc, model)
        return digest, written

    def complete_cut(self, model: str, version: int, cut_shards: list[int]) -> bool:
        """Write the manifest of cut ``version`` to every location if every shard holds a file of it."""
        files: dict[str, dict[str, Any]] = {}
        for shard in cut_shards:
            found = self._shard_manifest(model, version, shard)
            if found is None:
                return False
            files[str(shard)] = found
        cut = json.dumps({"version": version, "shards": files}, sort_keys=True).encode()
        for loc in self.locations:
            try:
                fs, root = self._fs(loc)
                fs.makedirs(f"{root}/cuts/{model}", exist_ok=True)
                self._atomic_write(fs, f"{root}/cuts/{model}/{_name(version)}.json", cut)
            except Exception as exc:
                log.warning("cut manifest not written", extra={"location": loc, "error": str(exc)})
        log.info("checkpoint cut complete", extra={"model": model, "version": version, "shards": cut_shards})
        return True

    def _shard_manifest(self, model: str, version: int, shard: int) -> dict[str, Any] | None:
        """The manifest of ``shard``'s file of ``version`` in the first location holding it."""
        for loc in self.locations:
            try:
                fs, root = self._fs(loc)
                manifest = json.loads(fs.cat_file(f"{self._folder(root, model, shard)}/{_name(version)}.json"))
                return {"file": f"shard-{shard}/{model}/{_name(version)}.safetensors", **manifest}
            except Exception:
                continue
        return None

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

    def _prune(self, loc: str, model: str) -> None:
        """Keep the ``keep`` newest files of this shard and every file from the newest complete cut on."""
        fs, root = self._fs(loc)
        folder = self._folder(root, model)
        cuts = self._cut_versions(fs, root, model)
        floor = max(cuts, default=0)
        versions = self._versions(fs, folder)
        for old in versions[: -self.keep]:
            if old >= floor:
                continue
            for ext in (".json", ".safetensors"):
                path = f"{folder}/{_name(old)}{ext}"
                if fs.exists(path):
                    fs.rm(path)
        for old in cuts[: -self.keep]:
            path = f"{root}/cuts/{model}/{_name(old)}.json"
            if fs.exists(path):
                fs.rm(path)

    def drop_after(self, model: str, version: int) -> None:
        """Remove this shard's files newer than ``version`` (a roll back to that cut): a later cut of the same
        version number must never pair them with the other shards' new files."""
        for loc in self.locations:
            try:
                fs, root = self._fs(loc)
                folder = self._folder(root, model)
                if not fs.isdir(folder):
                    continue
                for path in fs.ls(folder, detail=False):
                    v = _version(path)
                    if v is not None and v > version and ".tmp-" not in path:
                        fs.rm(path)
            except Exception as exc:
                log.warning("newer checkpoints not removed", extra={"location": loc, "error": str(exc)})

    def mark_used(self, model: str, version: int) -> None:
        """This shard's final checkpoint of ``version`` was restored: from now on it is an ordinary file."""
        for loc in self.locations:
            try:
                fs, root = self._fs(loc)
                path = f"{self._folder(root, model)}/{_name(version)}.json"
                manifest = json.loads(fs.cat_file(path))
                if manifest.get("final"):
                    self._atomic_write(fs, path, json.dumps({**manifest, "final": False}).encode())
            except Exception as exc:
                log.warning("final checkpoint not marked used", extra={"location": loc, "error": str(exc)})

    # -- reading -----------------------------------------------------------------------------------------

    @staticmethod
    def _versions(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
        """Versions with a manifest in ``folder``, ascending."""
        if not fs.isdir(folder):
            return []
        paths = [p for p in fs.ls(folder, detail=False) if p.endswith(".json")]
        return sorted(v for v in map(_version, paths) if v is not None)

    def _cut_versions(self, fs: fsspec.AbstractFileSystem, root: str, model: str) -> list[int]:
        return self._versions(fs, f"{root}/cuts/{model}")

    def models(self) -> list[str]:
        """Models of which this shard has at least one file in any reachable location."""
        found: set[str] = set()
        for loc in self.locations:
            try:
                fs, root = self._fs(loc)
                folder = f"{root}/shard-{self.shard}"
                if not fs.exists(folder):
                    continue
                for entry in fs.ls(folder, detail=True):
                    if entry["type"] == "directory":
                        found.add(entry["name"].rstrip("/").rsplit("/", 1)[-1])
            except Exception:
                continue
        return sorted(found)

    def restore(self, model: str, version: int | None = None) -> Restored | None:
        """This shard's checkpoint to restore: the newest complete cut (or ``version``, which must be a
        complete cut), unless this shard's newest file is an unused final checkpoint of a graceful stop.
        Files that do not verify are skipped, with what was skipped on the way."""
        own: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        cuts: set[int] = set()
        skipped: list[str] = []
        for loc in self.locations:
            try:
                fs, root = self._fs(loc)
                folder = self._folder(root, model)
                if not fs.isdir(root):
                    skipped.append(f"{loc}: unreachable (no replica folder at {root})")
                    continue
                cuts.update(self._cut_versions(fs, root, model))
                if not fs.isdir(folder):
                    skipped.append(f"{loc}: holds no checkpoint of {model}")
                    continue
                for path in fs.ls(folder, detail=False):
                    if path.endswith(".json"):
                        try:
                            manifest = json.loads(fs.cat_file(path))
                            own.setdefault(int(manifest["version"]), []).append((loc, manifest))
                        except (ValueError, KeyError) as exc:
                            skipped.append(f"{loc}: unreadable manifest {path} ({exc})")
            except Exception as exc:
                skipped.append(f"{loc}: unreachable ({type(exc).__name__}: {exc})")
        # A version whose every shard file is there is a complete cut even if the process that wrote the last
        # file died before the cut's manifest (written now): always so for a model on this shard alone.
        for v in sorted((v for v in own if v > max(cuts, default=-1)), reverse=True):
            shards = next((m["cut_shards"] for _, m in own[v] if "cut_shards" in m), None)
            if shards is not None and self.complete_cut(model, v, shards):
                cuts.add(v)
                break
        order: list[tuple[int, bool]] = []
        if version is None:
            newest = max(own, default=None)
            if newest is not None and newest not in cuts and any(m.get("final") for _, m in own[newest]):
                order.append((newest, True))
            order += [(v, False) for v in sorted(cuts & set(own), reverse=True)]
        elif version in cuts and version in own:
            order.append((version, False))
        for v, final in order:
            for loc, manifest in own[v]:
                if final and not manifest.get("final"):
                    continue
                got = self._read(model, v, loc, manifest, skipped)
                if got is not None:
                    for s in skipped:
                        log.warning("checkpoint replica skipped", extra={"model": model, "detail": s})
                    return Restored(v, got[0], got[1], loc, final or bool(manifest.get("final")), skipped)
        for s in skipped:
            log.warning("checkpoint replica skipped", extra={"model": model, "detail": s})
        return None

    def _read(
        self, model: str, version: int, loc: str, manifest: dict[str, Any], skipped: list[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The arrays and metadata of one replica's file, if its checksum verifies."""
        fs, root = self._fs(loc)
        try:
            data = fs.cat_file(f"{self._folder(root, model)}/{_name(version)}.safetensors")
        except Exception as exc:
            skipped.append(f"{loc}: v{version} unreadable ({type(exc).__name__})")
            return None
        if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            skipped.append(f"{loc}: v{version} corrupt or partial (checksum mismatch)")
            return None
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = json.loads(header.get("__metadata__", {}).get("guardmesh", "{}"))
        return st_load(data), metadata
