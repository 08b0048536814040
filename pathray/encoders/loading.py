"""Weight loading: HF hub, local hub-layout directory, a single checkpoint file, or a remote
copy of one; and the identity of weights a store version records.

Every load records a fingerprint: ``hf:<repo>@<commit>`` for the hub, ``sha256:<hex>`` of the
weights file otherwise (:mod:`pathray.encoders.checkpoint` reads files,
:mod:`pathray.encoders.hub` the hub).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pathray.errors import WeightsUnavailableError

from .checkpoint import WEIGHT_FILENAMES, LoadedWeights, file_sha256, find_weights_file, read_config, read_state_dict
from .hub import HUB_PREFIXES, hub_commit, load_from_hub
from .offline import is_remote_source, local_copy, remote_identity
from .spec import EncoderSpec


def load_weights(spec: EncoderSpec, weights: str | os.PathLike | None) -> LoadedWeights:
    """Resolve ``weights`` (None -> the spec's hub repo) and read its state dict + config."""
    if weights is None:
        if not spec.hf_hub_id:
            raise WeightsUnavailableError(
                f"{spec.name}: no default weights; pass weights= a local hub-layout dir, a checkpoint file "
                "or hf-hub:org/name"
            )
        return load_from_hub(spec, spec.hf_hub_id)
    text = os.fspath(weights)
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            return load_from_hub(spec, text[len(prefix) :])
    if is_remote_source(text):
        try:
            local = local_copy(text)
        except (OSError, ValueError) as exc:
            raise WeightsUnavailableError(f"{spec.name}: cannot copy weights {text}: {exc}") from exc
        loaded = load_weights(spec, local)
        return LoadedWeights(loaded.state_dict, loaded.config, text, remote_identity(text))
    if text.startswith("file://"):
        text = urlparse(text).path
    path = Path(text).expanduser()
    if path.is_dir():
        cfg = read_config(path)
        wfile = find_weights_file(path)
        return LoadedWeights(read_state_dict(wfile), cfg, str(path), "sha256:" + file_sha256(wfile))
    if path.is_file():
        cfg = read_config(path.parent) if path.name in WEIGHT_FILENAMES else {}
        return LoadedWeights(read_state_dict(path), cfg, str(path), "sha256:" + file_sha256(path))
    raise WeightsUnavailableError(
        f"{spec.name}: weights {text!r} not found: expected a hub-layout directory, a .safetensors/.pth/.bin "
        "file, or hf-hub:org/name"
    )


def weights_identity(spec: EncoderSpec, weights: str | os.PathLike | None) -> str:
    """What the weights *are*, not where they lie: ``sha256:<hex>`` of a local weights file
    (the same file moved elsewhere keeps its identity; another file written over the same
    path does not), ``hf:<repo>@<commit>`` for the hub (the commit from the local HF cache or
    a pinned ``@revision``; ``@<revision name>`` when neither resolves it), and
    ``unavailable:<source>`` for local weights that are not there (the run records
    ``weights_unavailable`` for them)."""
    text = os.fspath(weights) if weights is not None else None
    if text and is_remote_source(text):
        return remote_identity(text)
    hub = next((text[len(p) :] for p in HUB_PREFIXES if text and text.startswith(p)), None)
    if text is None or hub is not None:
        repo = hub or spec.hf_hub_id or ""
        repo_id, _, revision = repo.partition("@")
        return f"hf:{repo_id}@{hub_commit(repo_id, revision or 'main')}"
    path = Path(urlparse(text).path if text.startswith("file://") else text).expanduser()
    try:
        wfile = find_weights_file(path) if path.is_dir() else path
        return "sha256:" + file_sha256(wfile)
    except (OSError, WeightsUnavailableError):
        return f"unavailable:{text}"
