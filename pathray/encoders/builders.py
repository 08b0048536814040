"""How a spec's network is built and pooled: one :class:`Builder` per library.

``EncoderSpec.builder`` names one of :data:`BUILDERS`:

* ``timm`` — ``timm.create_model(architecture, **model_kwargs)`` (most ViT cards);
* ``transformers`` — ``transformers.<architecture>(<architecture>.config_class(**model_kwargs["config"]),
  **model_kwargs.get("init", {}))`` for cards published as ``transformers`` models (Phikon,
  Phikon-v2, Midnight, Hibou). Built from the spec's config only: no ``trust_remote_code``;
* ``module`` — a plain-PyTorch network written in :mod:`pathray.encoders.nets` where neither
  library has the architecture (CONCH's vision tower, CTransPath, ...):
  ``NETS[architecture](**model_kwargs)``, whose ``forward(x)`` returns the card's embedding.

Each builder also states how the embedding is pooled from its network's output
(``EncoderSpec.pooling``) and what ``config.json`` a random-weight directory gets.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from pathray.errors import WeightsMismatchError

#: tile pooling conventions -> the embedding they give, in words (each builder's ``pool`` computes them)
TILE_POOLINGS: dict[str, str] = {
    "cls": "CLS",
    "cls+mean_patch": "CLS ⊕ mean(patch)",
    "pooler": "pooler output",
    "model": "the net's own head",
}
#: the conventions of :data:`TILE_POOLINGS` each builder implements
POOLINGS_BY_BUILDER: dict[str, tuple[str, ...]] = {
    "timm": ("cls", "cls+mean_patch", "model"),
    "transformers": ("cls", "cls+mean_patch", "pooler"),
    "module": ("model",),
}


@dataclass(frozen=True)
class TimmBuilder:
    """timm architectures: ``pooling`` "cls" and "model" are ``model(x)`` with
    ``num_classes=0`` (timm's own pooling: the CLS token for ViTs, global average pooling for
    CNNs/Swin); "cls+mean_patch" concatenates the CLS token and the mean of the patch tokens
    (register tokens excluded) of ``forward_features`` (final norm applied)."""

    name: str = "timm"

    def create(self, arch: str, kwargs: dict[str, Any], *, meta: bool = False) -> torch.nn.Module:
        import timm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if meta:
                with torch.device("meta"):
                    return timm.create_model(arch, pretrained=False, **kwargs)
            return timm.create_model(arch, pretrained=False, **kwargs)

    def pool(self, model: torch.nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
        if pooling in ("cls", "model"):
            return model(x)
        tokens = model.forward_features(x)
        patches = tokens[:, getattr(model, "num_prefix_tokens", 1) :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)

    def config_architecture(self, config: dict[str, Any]) -> str | None:
        arch = config.get("architecture")
        return arch.split(".")[0] if isinstance(arch, str) else None

    def hub_config(self, arch: str, kwargs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
        return {"architecture": arch, "num_classes": 0, "num_features": int(getattr(model, "num_features", 0) or 0)}

    def to_release(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict

    def from_release(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict


@dataclass(frozen=True)
class TransformersBuilder:
    """``transformers`` models, built from the spec's config (``model_kwargs["config"]``) and
    constructor arguments (``model_kwargs["init"]``, e.g. ``add_pooling_layer=False``).
    ``pooling``: "cls" is ``last_hidden_state[:, 0]``; "cls+mean_patch" concatenates it with
    the mean of the patch tokens (after the CLS and ``num_register_tokens`` registers);
    "pooler" is ``pooler_output``."""

    name: str = "transformers"

    def create(self, arch: str, kwargs: dict[str, Any], *, meta: bool = False) -> torch.nn.Module:
        transformers = importlib.import_module("transformers")
        cls = getattr(transformers, arch)
        config = cls.config_class(**kwargs.get("config", {}))
        config._attn_implementation = "eager"  # the cards' reference path; exact on CPU and GPU
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if meta:
                with torch.device("meta"):
                    return cls(config, **kwargs.get("init", {}))
            return cls(config, **kwargs.get("init", {}))

    def pool(self, model: torch.nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
        out = model(pixel_values=x)
        if pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        return torch.cat([hidden[:, 0], hidden[:, skip:].mean(dim=1)], dim=-1)

    def config_architecture(self, config: dict[str, Any]) -> str | None:
        archs = config.get("architectures")
        return archs[0] if isinstance(archs, list) and archs else None

    def hub_config(self, arch: str, kwargs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config.to_dict()
        cfg["architectures"] = [arch]
        return cfg

    def to_release(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint layout ``save_pretrained`` writes, which is the hub's: transformers renamed
        modules (ViT/DINOv2 ``attention.attention.query`` is now ``attention.q_proj``, DINOv2's
        SwiGLU ``weights_in`` is split into ``gate_proj``/``up_proj``) and converts published
        checkpoints on load; this is its own reverse conversion."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(model, dict(state_dict))

    def from_release(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A published checkpoint's keys in this transformers version's module names: the renamings
        and conversions ``from_pretrained`` applies for ``model``'s class (its conversion mapping).
        Keys no rule matches are kept as they are, so a strict load reports them."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_converters, apply_renamings

        transforms = get_model_conversion_mapping(model, add_legacy=False)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, Any] = {}
        for key, tensor in state_dict.items():
            renamed, pattern = apply_converters(apply_renamings(key, renamings), converters)
            if pattern is None:
                out[renamed] = tensor
            else:
                pending.setdefault(renamed, copy.deepcopy(by_pattern[pattern])).add_tensor(
                    renamed, key, pattern, tensor
                )
        for first, converter in pending.items():
            for name, value in converter.convert(first, model=model, config=model.config).items():
                out[name] = value[0] if isinstance(value, list) else value
        return out


@dataclass(frozen=True)
class ModuleBuilder:
    """Networks written in :mod:`pathray.encoders.nets`: ``NETS[arch](**kwargs)``; its
    ``forward(x)`` is the card's embedding (``pooling`` "model")."""

    name: str = "module"

    def create(self, arch: str, kwargs: dict[str, Any], *, meta: bool = False) -> torch.nn.Module:
        from .nets import NETS

        if arch not in NETS:
            raise KeyError(f"no network {arch!r} in pathray.encoders.nets (known: {', '.join(sorted(NETS))})")
        if meta:
            with torch.device("meta"):
                return NETS[arch](**kwargs)
        return NETS[arch](**kwargs)

    def pool(self, model: torch.nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
        return model(x)

    def config_architecture(self, config: dict[str, Any]) -> str | None:
        arch = config.get("architecture")
        return arch if isinstance(arch, str) else None

    def hub_config(self, arch: str, kwargs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
        return {"architecture": arch}

    def to_release(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict

    def from_release(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict


BUILDERS = {b.name: b for b in (TimmBuilder(), TransformersBuilder(), ModuleBuilder())}

#: the architecture argument that sets the number of transformer blocks, by builder (tests and
#: benchmarks shrink a model to a few blocks of full width; ``module`` nets take ``depth``)
DEPTH_KEYS = {"timm": "depth", "transformers": "num_hidden_layers", "module": "depth"}


def depth_override(builder: str, depth: int) -> dict[str, int]:
    """Architecture overrides that shrink a ``builder`` network to ``depth`` blocks."""
    return {DEPTH_KEYS[builder]: int(depth)}


def get_builder(name: str) -> TimmBuilder | TransformersBuilder | ModuleBuilder:
    return BUILDERS[name]


def check_config_architecture(
    spec_name: str, builder: str, arch: str, config: dict[str, Any], aliases: tuple[str, ...] = ()
) -> None:
    """Raise :class:`WeightsMismatchError` when a ``config.json`` names another architecture
    than ``arch`` (timm's pretrained tag ignored: ``vit_small_patch16_224.augreg`` is
    ``vit_small_patch16_224``) or one of its ``aliases`` (the name a hub config gives the same
    network, e.g. a ``trust_remote_code`` class)."""
    named = get_builder(builder).config_architecture(config or {})
    if named and named.split(".")[0] not in {arch.split(".")[0], *aliases}:
        hint = f"; use timm:{named}" if spec_name.startswith("timm:") else ""
        raise WeightsMismatchError(
            f"{spec_name} is a {arch}, but the weights' config.json says architecture {named!r}{hint}"
        )


def to_release_layout(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The network's state dict with the key prefix of the published checkpoint (e.g. ``visual.``)."""
    return {prefix + k: v for k, v in state_dict.items()}


def from_release_layout(
    state_dict: dict[str, torch.Tensor], prefix: str, ignore: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The published checkpoint's keys for the network: keys under an ``ignore`` prefix (parts
    of the release that are not the tile encoder, e.g. a CLIP text tower) are dropped, ``prefix``
    is stripped. An ``ignore`` entry containing ``*`` is a glob over the whole key instead (e.g.
    ``*.B.*``: the text experts interleaved in a multiway transformer). Keys outside both are
    kept as they are, so a strict load reports them."""
    if not prefix and not ignore:
        return state_dict
    prefixes = tuple(p for p in ignore if "*" not in p)
    globs = [p for p in ignore if "*" in p]
    out = {}
    for key, value in state_dict.items():
        if (prefixes and key.startswith(prefixes)) or any(fnmatch.fnmatchcase(key, g) for g in globs):
            continue
        out[key[len(prefix) :] if prefix and key.startswith(prefix) else key] = value
    return out
