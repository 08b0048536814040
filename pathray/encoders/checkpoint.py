"""Weights on disk: checkpoint files and hub-layout directories read into state dicts, and
state dicts loaded strictly into models.

A *hub-layout directory* is what ``huggingface_hub.snapshot_download`` (or
:func:`pathray.encoders.write_random_weights`) leaves on disk: ``config.json`` (timm style:
``architecture``, ``model_args``, ``pretrained_cfg``; optional) next to
``model.safetensors`` or ``pytorch_model.bin``. Pickled checkpoints (``.pth``/``.bin``/``.pt``)
are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathray.errors import WeightsCorruptError, WeightsMismatchError, WeightsUnavailableError

from .spec import EncoderSpec

WEIGHT_FILENAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth", "pytorch_model_vision.bin")
PICKLE_SUFFIXES = (".pth", ".bin", ".pt", ".ckpt", ".torch")  # .torch: Lunit's releases


@dataclass
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # parsed config.json, {} when none
    source: str  # "hf-hub:org/name" | local path (no credentials)
    fingerprint: str  # "hf:org/name@sha" | "sha256:..."


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
