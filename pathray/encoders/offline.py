"""Weights without hub access: a weights folder per cluster and weights in a bucket.

A cluster that cannot reach the Hugging Face hub (or has no access to a gated repo) runs
from weights a person downloaded once, kept on a shared volume or in a bucket:

* ``PATHRAY_WEIGHTS_DIR=<dir>`` — ``<dir>/<model>/`` in hub layout (what
  ``huggingface_hub.snapshot_download(repo, local_dir=<dir>/<model>)`` leaves) is used for every
  model with no explicit weights. Resolved on the driver when the job config is built, so
  actors receive a plain path.
* ``weights: {model: source}`` in the job YAML (or ``--weights MODEL=SOURCE``), where a source may
  be ``s3://bucket/prefix`` (a hub-layout folder or one checkpoint file): each node copies it once
  into a local cache (``PATHRAY_WEIGHTS_CACHE``, default ``<tmp>/pathray-weights``) and loads it
  from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

WEIGHTS_DIR_ENV = "PATHRAY_WEIGHTS_DIR"
WEIGHTS_CACHE_ENV = "PATHRAY_WEIGHTS_CACHE"
#: files of a hub-layout folder worth copying (weights, their config, sharded-index files)
_WANTED_SUFFIXES = (".json", ".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def weights_dir_source(model: str, environ: dict[str, str] | None = None) -> str | None:
    """``<PATHRAY_WEIGHTS_DIR>/<model>`` when that folder exists, else None."""
    root = (environ if environ is not None else os.environ).get(WEIGHTS_DIR_ENV)
    if not root:
        return None
    folder = Path(root).expanduser() / model
    return str(folder) if folder.is_dir() else None


def is_remote_source(source: str) -> bool:
    """True for weights in object storage (:func:`pathray.fs.is_remote`)."""
    from pathray.fs import is_remote

    return is_remote(source)


def remote_identity(source: str) -> str:
    """What remote weights are, without downloading them: the object's ETag (the weights file's
    for a folder), ``unavailable:<source>`` when it cannot be listed."""
    from pathray.fs import split_uri

    fs, path = split_uri(source)
    try:
        target = _remote_weights_file(fs, path) if fs.isdir(path) else path
        info = fs.info(target)
    except (OSError, FileNotFoundError, ValueError):
        return f"unavailable:{source}"
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return f"etag:{etag}" if etag else f"size:{info.get('size')}@{source}"


def _remote_weights_file(fs, path: str) -> str:
    from .checkpoint import WEIGHT_FILENAMES

    names = {p.rsplit("/", 1)[-1]: p for p in fs.ls(path, detail=False)}
    for name in WEIGHT_FILENAMES:
        if name in names:
            return names[name]
    safes = sorted(p for n, p in names.items() if n.endswith(".safetensors"))
    if len(safes) == 1:
        return safes[0]
    raise FileNotFoundError(f"no weights file in s3://{path}")


def local_copy(source: str) -> Path:
    """A node-local copy of remote weights ``source`` (folder or file), made once per node and
    cache folder; concurrent callers race safely (each copies into its own temporary folder,
    the first rename wins). Returns the local folder, or the local file for a file source."""
    from pathray.fs import split_uri

    fs, path = split_uri(source)
    cache_root = Path(os.environ.get(WEIGHTS_CACHE_ENV) or Path(tempfile.gettempdir()) / "pathray-weights")
    final = cache_root / hashlib.sha256(source.encode()).hexdigest()[:16]
    is_dir = fs.isdir(path)
    if not final.exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
        try:
            files = [p for p in fs.ls(path, detail=False) if p.endswith(_WANTED_SUFFIXES)] if is_dir else [path]
            for remote in files:
                fs.get(remote, str(tmp / remote.rsplit("/", 1)[-1]))
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final if is_dir else final / path.rsplit("/", 1)[-1]
