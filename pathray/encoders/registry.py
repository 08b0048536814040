"""The registry: every supported model's :class:`EncoderSpec`, by name.

Specs are data, kept by family in :mod:`pathray.encoders.zoo` (one module per family, each
with a ``SPECS`` list); each records what is needed to rebuild a model card's recipe
exactly: the builder and architecture with its keyword arguments, where the weights live,
the preprocessing, the pooling and the tile the model was trained on. Values follow the
model cards and official code of each model (see ``docs/models.md``).

``timm:<architecture>`` names any timm architecture (a user's own backbone); its spec is
derived on the fly from timm's default pretrained config for that architecture.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from pathray.errors import UnknownModelError

from .spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, Preprocess  # noqa: F401 - re-exported
from .zoo import all_specs

REGISTRY: dict[str, EncoderSpec] = {s.name: s for s in all_specs()}

TIMM_PREFIX = "timm:"


def native_tile_mismatch(models: list[str] | tuple[str, ...], tile_px: int, target_mpp: float) -> str | None:
    """A warning text when the known ``models`` expect different native tiles (px at µm/px),
    saying what a run tiled at ``tile_px`` px and ``target_mpp`` µm/px gives each; else None.
    Unknown names are ignored (the job records them as errors)."""
    specs = [REGISTRY[m] for m in models if m in REGISTRY]
    if len({(s.tile_px, s.native_mpp) for s in specs}) < 2:
        return None
    expects = ", ".join(f"{s.name}: {s.tile_px} px at {s.native_mpp:g} µm/px" for s in specs)
    others = [s.name for s in specs if (s.tile_px, s.native_mpp) != (tile_px, target_mpp)]
    return (
        f"models expect different native tiles ({expects}); this run cuts one tiling, {tile_px} px at "
        f"{target_mpp:g} µm/px, for every model, and each model's own Resize/CenterCrop is applied to those "
        f"tiles, so {', '.join(others)} see(s) a field of view other than the card's. Leave tile_px and "
        "target_mpp unset (no --tile-px/--target-mpp) to embed each model at its own native tile."
    )


def list_models() -> list[str]:
    """Registered model names (the generic ``timm:<architecture>`` entry is not listed)."""
    return list(REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    """Spec of a registered model, or a generic spec for ``timm:<architecture>``."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX) :])
    known = ", ".join(list_models())
    raise UnknownModelError(f"unknown model {name!r}; known models: {known}, or timm:<architecture>")


@functools.lru_cache(maxsize=64)
def _timm_spec(architecture: str) -> EncoderSpec:
    import timm

    if not architecture or not timm.is_model(architecture):
        known = ", ".join(list_models())
        raise UnknownModelError(
            f"unknown timm architecture {architecture!r} (see timm.list_models()); registered models: {known}"
        )
    cfg = timm.get_pretrained_cfg(architecture) or None
    cfg = cfg.to_dict() if cfg is not None else {}
    spec = spec_from_pretrained_cfg(f"{TIMM_PREFIX}{architecture}", architecture, {"num_classes": 0}, cfg)
    return dataclasses.replace(spec, embed_dim=_meta_output_dim(architecture, spec.input_px))


def _meta_output_dim(architecture: str, input_px: int) -> int:
    """Embedding width of ``timm.create_model(architecture, num_classes=0)``, found on the
    meta device (no memory, no compute); 0 if that cannot be determined."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=0)
            return int(model(torch.empty(1, 3, input_px, input_px)).shape[-1])
    except Exception:  # noqa: BLE001 - exotic models: resolved from the loaded model instead
        return 0


def spec_from_pretrained_cfg(
    name: str, architecture: str, model_kwargs: dict[str, Any], cfg: dict[str, Any], embed_dim: int = 0
) -> EncoderSpec:
    """A generic spec following timm's eval transform for ``cfg`` (a pretrained_cfg dict)."""
    input_size = tuple(cfg.get("input_size") or (3, 224, 224))
    crop = int(input_size[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interp = cfg.get("interpolation") or "bicubic"
    if interp not in ("bilinear", "bicubic"):
        interp = "bicubic"
    return EncoderSpec(
        name=name,
        family="timm " + architecture,
        architecture=architecture,
        model_kwargs=dict(model_kwargs),
        embed_dim=embed_dim,  # 0: resolved from the built model
        input_px=crop,
        native_mpp=0.5,
        preprocess=Preprocess(
            resize_px=int(crop / crop_pct),
            crop_px=crop,
            interpolation=interp,
            mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
            std=tuple(cfg.get("std") or IMAGENET_STD),
        ),
        pooling="cls",  # the model's own head (num_classes=0 -> pooled features)
        hf_hub_id=cfg.get("hf_hub_id") or None,
        license=str(cfg.get("license") or "see the architecture's weights"),
        notes="generic timm backbone: embedding = model(x) with num_classes=0",
    )
