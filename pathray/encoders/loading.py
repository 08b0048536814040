"""Weight loading: HF hub, local hub-layout directory, or a single checkpoint file.

A *hub-layout directory* is what ``huggingface_hub.snapshot_download`` (or
:func:`pathray.encoders.write_random_weights`) leaves on disk: ``config.json`` (timm style:
``architecture``, ``model_args``, ``pretrained_cfg``; optional) next to
``model.safetensors`` or ``pytorch_model.bin``.

Pickled checkpoints (``.pth``/``.bin``/``.pt``) are only ever read with
``torch.load(weights_only=True)``. Every load records a fingerprint: ``hf:<repo>@<commit>`` for
the hub, ``sha256:<hex>`` of the weights file otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from pathray.errors import WeightsCorruptError, WeightsMismatchError, WeightsUnavailableError

from .offline import WEIGHTS_DIR_ENV, is_remote_source, local_copy, remote_identity
from .spec import EncoderSpec

WEIGHT_FILENAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth", "pytorch_model_vision.bin")
PICKLE_SUFFIXES = (".pth", ".bin", ".pt", ".ckpt", ".torch")  # .torch: Lunit's releases
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
#: seconds allowed to reach the hub before failing over to the local cache / a clear error
DEFAULT_HUB_TIMEOUT_S = 5.0


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # parsed config.json, {} when none
    source: str  # "hf-hub:org/name" | local path (no credentials)
    fingerprint: str  # "hf:org/name@sha" | "sha256:..."


# --------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# --------------------------------------------------------------------------------------
# reading state dicts
# --------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: safetensors, or a pickle through ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsCorruptError(f"cannot parse safetensors file {path}: {exc}") from exc
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
        except Exception as exc:
            kind = "not a weights-only checkpoint (it contains pickled code/objects) or corrupt"
            raise WeightsCorruptError(f"cannot load {path} with torch.load(weights_only=True): {kind}: {exc}") from exc
        sd = _unwrap_state_dict(obj, path)
    else:
        raise WeightsCorruptError(
            f"unsupported weights file {path}: expected .safetensors (preferred) or {'/'.join(PICKLE_SUFFIXES)}"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsCorruptError(f"{path}: entries that are not tensors: {bad[:5]}")
    return sd


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in tensors.items()}
    raise WeightsCorruptError(f"{path} does not hold a state dict (got {type(obj).__name__})")


def read_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsCorruptError(f"cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise WeightsCorruptError(f"{cfg_path} is not a JSON object")
    return cfg


def find_weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILENAMES:
        if (directory / name).is_file():
            return directory / name
    safes = sorted(directory.glob("*.safetensors"))
    if len(safes) == 1:
        return safes[0]
    raise WeightsUnavailableError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILENAMES)} (hub layout)"
    )


# --------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------
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


def _hub_timeout() -> float:
    try:
        return float(os.environ.get("PATHRAY_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT_S))
    except ValueError:
        return DEFAULT_HUB_TIMEOUT_S


def hub_reachable(repo_id: str = "", revision: str | None = None, timeout: float | None = None) -> bool:
    """One HTTP ``HEAD`` of the repo's ``config.json`` on the HF endpoint, no retries.

    ``huggingface_hub`` retries connection errors and 5xx answers with back-off (~25 s in
    all); this probe decides up front, within ``timeout`` seconds (``PATHRAY_HUB_TIMEOUT``,
    default 5), whether to go online or straight to the local cache. Any HTTP answer other
    than 5xx/429 counts as reachable (401/403/404 are then reported by huggingface_hub).
    The probe runs in a daemon thread because DNS resolution has no timeout of its own.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    timeout = _hub_timeout() if timeout is None else timeout
    if getattr(constants, "HF_HUB_OFFLINE", False) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
    ):
        return False
    url = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}/resolve/{revision or 'main'}/config.json"
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                status = r.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except Exception:  # noqa: BLE001 - any transport failure means "not reachable"
            result.append(False)
            return
        result.append(not (status >= 500 or status == 429))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def load_from_hub(spec: EncoderSpec, repo: str) -> LoadedWeights:
    """Download (or find in the local HF cache) config.json + weights of ``repo[@revision]``."""
    from huggingface_hub import errors as hf_errors

    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    online = hub_reachable(repo_id, revision)
    with _hub_errors(spec.name, repo_id, spec.gated, online):
        try:
            cfg_file = _hub_get(repo_id, revision, "config.json", online)
            cfg = json.loads(Path(cfg_file).read_text())
        except hf_errors.EntryNotFoundError:
            cfg = {}
        wfile = None
        last_exc: Exception | None = None
        for name in hub_weight_filenames(spec):
            try:
                wfile = _hub_get(repo_id, revision, name, online)
                break
            except hf_errors.EntryNotFoundError as exc:
                # LocalEntryNotFoundError is an EntryNotFoundError: offline and not cached
                if isinstance(exc, hf_errors.LocalEntryNotFoundError):
                    raise
                last_exc = exc
        if wfile is None:
            raise WeightsUnavailableError(
                f"{spec.name}: hub repo {repo_id} has no {' or '.join(hub_weight_filenames(spec))} ({last_exc})"
            )
    return LoadedWeights(
        read_state_dict(wfile), cfg if isinstance(cfg, dict) else {}, f"hf-hub:{repo}", _hub_fingerprint(repo_id, wfile)
    )


def hub_weight_filenames(spec: EncoderSpec) -> tuple[str, ...]:
    """The files of a hub repo that hold the spec's weights, in order of preference: the spec's
    ``extra["hub_weights_file"]`` where the card names one (e.g. GenBio-PathFM's ``model.pth``,
    next to a ``model.safetensors`` in another layout), else ``model.safetensors``, ``pytorch_model.bin``."""
    named = spec.extra.get("hub_weights_file")
    return (named,) if named else ("model.safetensors", "pytorch_model.bin")


def download_hub_file(what: str, repo: str, filename: str, *, gated: bool) -> tuple[str, str]:
    """``(local path, fingerprint)`` of one file of hub repo ``repo[@revision]``, downloaded or
    from the local HF cache, with the same reachability probe and errors as :func:`load_from_hub`
    (:class:`WeightsUnavailableError` naming ``what``)."""
    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    online = hub_reachable(repo_id, revision)
    with _hub_errors(what, repo_id, gated, online):
        path = _hub_get(repo_id, revision, filename, online)
    return path, _hub_fingerprint(repo_id, path)


def _hub_get(repo_id: str, revision: str | None, filename: str, online: bool) -> str:
    from huggingface_hub import constants, hf_hub_download

    return hf_hub_download(
        repo_id,
        filename,
        revision=revision,
        local_files_only=not online,
        etag_timeout=_hub_timeout(),
        endpoint=constants.ENDPOINT,
    )


def _hub_fingerprint(repo_id: str, path: str) -> str:
    m = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", path)
    return f"hf:{repo_id}@{m.group(1)}" if m else "sha256:" + file_sha256(path)


@contextlib.contextmanager
def _hub_errors(what: str, repo_id: str, gated: bool, online: bool) -> Iterator[None]:
    """Map huggingface_hub failures to :class:`WeightsUnavailableError` with what to do about them."""
    from huggingface_hub import errors as hf_errors

    how_to = (
        f"{repo_id} is gated: request access at https://huggingface.co/{repo_id}, then `hf auth login` or set HF_TOKEN"
        if gated
        else f"check the repo id https://huggingface.co/{repo_id}"
    )
    offline_hint = (
        f"or run offline: download it where the hub is reachable (huggingface_hub.snapshot_download('{repo_id}', "
        f"local_dir=DIR/<model>)) and set {WEIGHTS_DIR_ENV}=DIR, or name the folder (local or s3://) in the job "
        "YAML's `weights: {<model>: SOURCE}` / `--weights <model>=SOURCE`"
    )
    try:
        yield
    except hf_errors.GatedRepoError as exc:
        raise WeightsUnavailableError(f"{what}: {repo_id} is gated and this account has no access: {how_to}") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise WeightsUnavailableError(
            f"{what}: {repo_id} not found or not accessible without a token ({how_to})"
        ) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        state = "the HF hub is unreachable (no network, or HF_HUB_OFFLINE=1)" if not online else "download failed"
        raise WeightsUnavailableError(
            f"{what}: {state} and {repo_id} is not in the local HF cache; {how_to}, {offline_hint}"
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise WeightsUnavailableError(f"{what}: HF hub error for {repo_id}: {exc}; {how_to}") from exc
    except OSError as exc:
        raise WeightsUnavailableError(f"{what}: cannot fetch {repo_id}: {exc}; {offline_hint}") from exc


# --------------------------------------------------------------------------------------
# state dict <-> model
# --------------------------------------------------------------------------------------
def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


#: BatchNorm's training-step counter: checkpoints saved before torch 0.4.1 (e.g. torchvision's
#: ResNet-50 ``resnet50-19c8e357.pth``) lack it, torch fills it on load, and eval never reads it
_BN_COUNTER = ".num_batches_tracked"


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Problems (missing / unexpected / wrong-shape keys) of ``sd`` for ``model``; [] if it fits.
    A missing BatchNorm ``num_batches_tracked`` counter is not a problem (see ``_BN_COUNTER``)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted((k for k in expected if k not in sd and not k.endswith(_BN_COUNTER)), key=_natural)
    unexpected = sorted((k for k in sd if k not in expected), key=_natural)
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in sorted(expected, key=_natural)
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    return problems


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, what: str) -> torch.nn.Module:
    """Strictly load ``sd`` into ``model`` (which may live on the meta device), or raise
    :class:`WeightsMismatchError` naming the offending keys. Keys and shapes must match the
    architecture exactly: nothing is resampled, renamed or dropped here (see
    :func:`card_adaptations` for the one resampling a model card may prescribe)."""
    problems = check_state_dict(model, sd)
    if problems:
        raise WeightsMismatchError(f"{what} does not fit {type(model).__name__}: " + "; ".join(problems))
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model


def card_adaptations(
    spec: EncoderSpec, model: torch.nn.Module, sd: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply the weight adaptation a model card prescribes, and only that one.

    Today the only one is a position-embedding grid trained at another image size (e.g.
    kaiko ViT-L/14's 518-px release used at 224 px), allowed when ``spec.pos_embed_resample``
    names the card's reason. It is resampled exactly as timm's ``checkpoint_filter_fn`` does
    when the card's loader builds the model (bicubic, antialiased, prefix tokens kept).
    Everything else must already fit. Returns ``(state_dict, notes)``; each note is recorded
    in provenance."""
    pos = sd.get("pos_embed")
    target = model.state_dict().get("pos_embed")
    if not spec.pos_embed_resample or pos is None or target is None or pos.shape == target.shape:
        return sd, []
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(model.patch_embed.grid_size)
    old = int(round((pos.shape[1] - prefix) ** 0.5))
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=grid, num_prefix_tokens=prefix, interpolation="bicubic", antialias=True, verbose=False
    )
    return out, [f"pos_embed resampled from a {old}x{old} to a {grid[0]}x{grid[1]} grid ({spec.pos_embed_resample})"]


# --------------------------------------------------------------------------------------
# identity of weights (store versions)
# --------------------------------------------------------------------------------------
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
        return f"hf:{repo_id}@{_hub_commit(repo_id, revision or 'main')}"
    path = Path(urlparse(text).path if text.startswith("file://") else text).expanduser()
    try:
        wfile = find_weights_file(path) if path.is_dir() else path
        return "sha256:" + file_sha256(wfile)
    except (OSError, WeightsUnavailableError):
        return f"unavailable:{text}"


def _hub_commit(repo_id: str, revision: str) -> str:
    """The commit ``revision`` of ``repo_id`` points to in the local HF cache, if known."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or revision
    except OSError:
        return revision
