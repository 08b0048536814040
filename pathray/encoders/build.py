"""Build the network of a spec (through its builder), optionally shrunk by a pathray
random-weight ``config.json``."""

from __future__ import annotations

from typing import Any

import torch

from pathray.errors import WeightsMismatchError

from .builders import check_config_architecture, get_builder
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
    JSON ``model_args``; layer classes always come from the spec. A release whose config.json
    names the architecture it was cut from (``spec.extra["release_architecture"]``: CLAM's
    ResNet-50 trunk ships as timm's full ``resnet50``) is not another model.
    """
    kwargs = dict(spec.model_kwargs)
    arch = spec.architecture
    config = config or {}
    release_arch = spec.extra.get("release_architecture")
    if not (release_arch and config.get("architecture") == release_arch):
        check_config_architecture(
            spec.name, spec.builder, arch, config, tuple(spec.extra.get("config_architectures", ()))
        )
    written_for = (config.get("pathray") or {}).get("model")
    if (
        written_for
        and written_for != spec.name
        and not spec.name.startswith("timm:")
        and not _same_release(spec, written_for)
    ):
        # models of one architecture (H-optimus-0 and -1) are told apart by pathray's own record
        raise WeightsMismatchError(
            f"{spec.name}: these weights were written for {written_for!r} (config.json pathray.model)"
        )
    if spec.name.startswith("timm:"):
        overrides = config.get("model_args")
    else:
        overrides = (config.get("pathray") or {}).get("arch_overrides")
    if isinstance(overrides, dict):
        kwargs = apply_overrides(spec, kwargs, overrides)
    if spec.builder == "timm":
        kwargs["num_classes"] = 0
    return arch, kwargs


def apply_overrides(spec: EncoderSpec, kwargs: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with JSON ``overrides`` (e.g. ``depth=2``; layer classes always come from the
    spec). For ``transformers`` specs they apply to the model config (``num_hidden_layers=2``)."""
    layer_keys = set(spec.callable_model_args())
    clean = {k: v for k, v in overrides.items() if k not in layer_keys}
    if spec.builder == "transformers":
        return {**kwargs, "config": {**kwargs.get("config", {}), **clean}}
    return {**kwargs, **clean}


def create_model(arch: str, kwargs: dict[str, Any], *, meta: bool = False, builder: str = "timm") -> torch.nn.Module:
    """The network ``arch`` built by ``builder`` (default timm:
    ``timm.create_model(arch, pretrained=False, **kwargs)``); on the meta device if asked (no
    memory, no init: for parameter counts, shapes and ``load_state_dict(assign=True)``)."""
    return get_builder(builder).create(arch, kwargs, meta=meta)


def spec_for_config(spec: EncoderSpec, config: dict[str, Any] | None) -> EncoderSpec:
    """For the generic ``timm:`` entry, let a config.json's pretrained_cfg define the preprocessing."""
    if config and spec.name.startswith("timm:") and isinstance(config.get("pretrained_cfg"), dict):
        return spec_from_pretrained_cfg(spec.name, spec.architecture, spec.model_kwargs, config["pretrained_cfg"])
    return spec


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _same_release(spec: EncoderSpec, other: str) -> bool:
    """True when registered model ``other`` is read from the same published file as ``spec``
    (two embeddings of one release, e.g. MUSK's multi-scale and CLS)."""
    from .registry import REGISTRY

    twin = REGISTRY.get(other)
    return bool(twin and spec.hf_hub_id and twin.hf_hub_id == spec.hf_hub_id and twin.architecture == spec.architecture)
