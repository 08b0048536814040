"""Build the timm module of a spec, optionally with a hub ``config.json`` overriding it."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from pathray.errors import WeightsMismatchError

from .registry import EncoderSpec, spec_from_pretrained_cfg


def resolve_architecture(spec: EncoderSpec, config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Architecture name + kwargs: the spec's, with a ``config.json``'s ``model_args`` on top.

    ``config.json`` can only carry JSON values; layer classes (``mlp_layer``, ``act_layer``)
    always come from the spec. This is how a shrunk random model (``depth=2``) or a hub
    repo whose config differs from the card's defaults is rebuilt exactly.
    """
    kwargs = dict(spec.model_kwargs)
    arch = spec.architecture
    if config:
        cfg_arch = config.get("architecture")
        if cfg_arch and cfg_arch != arch and spec.name.startswith("timm:"):
            raise WeightsMismatchError(
                f"{spec.name} is a {arch}, but the weights' config.json says architecture {cfg_arch!r}; "
                f"use timm:{cfg_arch}"
            )
        # registered models: the spec's architecture + kwargs define the network (hub configs
        # may name an equivalent timm entry point); the strict state-dict check that follows
        # catches weights that do not fit
        model_args = config.get("model_args") or {}
        if not isinstance(model_args, dict):
            model_args = {}
        layer_keys = set(spec.callable_model_args())
        # layer classes come from code; a config's string for them (if any) is ignored
        kwargs.update({k: v for k, v in model_args.items() if k not in layer_keys})
        if "num_classes" in config and "num_classes" not in model_args:
            kwargs["num_classes"] = config["num_classes"]
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
