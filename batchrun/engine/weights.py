"""``engine.model_path`` as a store URI (``s3://``, ``gs://``): one local copy per node.

Engines read weights from a local folder, so a replica first makes sure its node holds a
copy (``ensure_local``), then fills ``{model_path}`` with that folder. Several replicas on
one node share it: the copy happens under a file lock, into a folder keyed by the URI in
the cache (``BATCHRUN_MODEL_CACHE``, else ``<tmp>/batchrun-models``), and counts only once
its completion marker exists, so a copy cut short (a killed actor) is redone, not used.
The driver checks beforehand that the URI lists objects (``check_listed``): an empty or
mistyped prefix is bad input before anything is reserved.

No Ray here: the filesystem comes from ``io/storage.locate`` under this process's store
configuration (``stores.configure(spec.storage)``, as the workers do).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from batchrun.errors import SpecError, UserError
from batchrun.io import storage, stores

__all__ = ["CACHE_ENV", "ModelCopyError", "cache_dir", "cache_root", "check_listed",
           "ensure_local", "is_uri", "marker_of"]

CACHE_ENV = "BATCHRUN_MODEL_CACHE"


class ModelCopyError(UserError):
    """A node could not copy the weights: fails that replica, naming the URI."""


def is_uri(model_path: str | None) -> bool:
    return bool(model_path) and stores.is_store(model_path or "")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "batchrun-models")


def cache_dir(uri: str, root: Path) -> Path:
    """The URI's folder in the cache: its last name (readable) + a hash of the whole URI
    (unique; a trailing slash or not is the same prefix)."""
    norm = uri.rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", norm.rsplit("/", 1)[-1])[:60] or "model"
    return root / f"{name}-{hashlib.sha256(norm.encode()).hexdigest()[:16]}"


def marker_of(folder: Path) -> Path:
    # beside the folder, not in it: the engine sees only the model's own files
    return folder.with_name(folder.name + ".complete")


def _objects(uri: str) -> list[pafs.FileInfo]:
    fs, path = storage.locate(uri)
    selector = pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True)
    return [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]


def check_listed(uri: str, where: str = "job spec") -> None:
    """On the driver, before anything starts: the URI must list at least one object."""
    try:
        found = _objects(uri)
    except OSError as e:
        raise SpecError(f"{where}: engine.model_path: cannot list {uri} ({stores.short(e)}); "
                        "check the URI, the endpoint and the credentials") from None
    if not found:
        raise SpecError(f"{where}: engine.model_path: {uri} lists no objects; give the prefix "
                        "holding the model's files (config.json, weights)")


def ensure_local(uri: str, root: Path | None = None) -> tuple[Path, bool]:
    """The local folder holding ``uri``'s objects, and whether this call copied them
    (False: another replica on this node did, now or before)."""
    dest = cache_dir(uri, root or cache_root())
    marker = marker_of(dest)
    if marker.exists():
        return dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other replicas of this node wait here
        if marker.exists():
            return dest, False
        shutil.rmtree(dest, ignore_errors=True)  # what a copy cut short left
        _copy(uri, dest)
        marker.write_text(uri + "\n")
    return dest, True


def _copy(uri: str, dest: Path) -> None:
    try:
        if not _objects(uri):
            raise ModelCopyError(f"engine.model_path: {uri} lists no objects on this node; "
                                 "check the URI and this node's credentials")
        fs, path = storage.locate(uri)
        pafs.copy_files(path.rstrip("/"), str(dest), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
    except OSError as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise ModelCopyError(f"engine.model_path: copying {uri} to {dest} failed "
                             f"({stores.short(e)}); check the node's credentials and disk "
                             "space") from None
