"""Build the timm module of a spec, optionally with a hub ``config.json`` overriding it."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from pathray.errors import WeightsMismatchError

from .registry import EncoderSpec, spec_from_pretrained_cfg


def resolve_architecture(spec: EncoderSpec, config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Architecture name + kwargs the weights must fit exactly.

    A ``config.json`` naming another architecture than the model asked for is a
    :class:`WeightsMismatchError` (compared without timm's pretrained tag,
    ``vit_small_patch16_224.augreg`` = ``vit_small_patch16_224``). Registered models are built
    from the card's kwargs alone: a hub config cannot turn one model into another (Virchow
    weights' ``reg_tokens=4`` would otherwise build Virchow2). The one exception is a
    pathray random-weight directory, whose ``config.json`` declares its shrinking under
    ``pathray.arch_overrides`` (e.g. ``depth=2``). ``timm:`` entries take the config's
    JSON ``model_args``; layer classes always come from the spec.
    """
    kwargs = dict(spec.model_kwargs)
    arch = spec.architecture
    config = config or {}
    cfg_arch = config.get("architecture")
    if cfg_arch and cfg_arch.split(".")[0] != arch.split(".")[0]:
        hint = f"; use timm:{cfg_arch}" if spec.name.startswith("timm:") else ""
        raise WeightsMismatchError(
            f"{spec.name} is a {arch}, but the weights' config.json says architecture {cfg_arch!r}{hint}")
    if spec.name.startswith("timm:"):
        overrides = config.get("model_args")
    else:
        overrides = (config.get("pathray") or {}).get("arch_overrides")
    layer_keys = set(spec.callable_model_args())
    if isinstance(overrides, dict):
        kwargs.update({k: v for k, v in overrides.items() if k not in layer_keys})
    kwargs["num_classes"] = 0
    return arch, kwargs


def create_model(arch: str, kwargs: dict[str, Any], *, meta: bool = False) -> torch.nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)``; on the meta device if asked
    (no memory, no init: for parameter counts, shapes and ``load_state_dict(assign=True)``)."""
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if meta:
            with torch.device("meta"):
                return timm.create_model(arch, pretrained=False, **kwargs)
        return timm.create_model(arch, pretrained=False, **kwargs)


def spec_for_config(spec: EncoderSpec, config: dict[str, Any] | None) -> EncoderSpec:
    """For the generic ``timm:`` entry, let a config.json's pretrained_cfg define the preprocessing."""
    if config and spec.name.startswith("timm:") and isinstance(config.get("pretrained_cfg"), dict):
        return spec_from_pretrained_cfg(spec.name, spec.architecture, spec.model_kwargs, config["pretrained_cfg"])
    return spec


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
