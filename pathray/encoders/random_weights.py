"""Random-initialised weights of a spec's exact architecture, saved in hub layout.

Used by the demo, the pipeline tests and the reference-equivalence tests: no real
weights can be downloaded there. ``load_encoder(EncoderConfig(model, weights=out_dir))``
rebuilds exactly the saved model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .build import apply_overrides, create_model
from .builders import get_builder, to_release_layout
from .registry import get_spec
from .spec import EncoderSpec, is_json_value


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """timm's init leaves LayerScale at ``init_values`` (1e-5), biases at 0, norms at 1 and
    the class/register tokens ~0: a model whose blocks barely contribute would hide
    mistakes in a reference comparison. Give those parameters values of a trained scale."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "lambda1") or ".ls" in name:  # LayerScale (timm, transformers)
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name and leaf == "weight":
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            elif leaf in (
                "cls_token",
                "reg_token",
                "pos_embed",
                "register_tokens",
                "position_embeddings",
                "mask_token",
            ):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def random_model(
    model: str | EncoderSpec, *, seed: int = 0, **arch_overrides: Any
) -> tuple[str, dict, torch.nn.Module]:
    """(architecture, kwargs, module) of a random init; bit-identical for a given seed on one
    set of ATen CPU kernels (``torch.randn``'s vectorised kernel gives other low bits under
    AVX-512 than under AVX2: the tests pin ``ATEN_CPU_CAPABILITY=avx2``)."""
    spec = get_spec(model) if isinstance(model, str) else model
    kwargs = apply_overrides(spec, dict(spec.model_kwargs), arch_overrides)
    if spec.builder == "timm":
        kwargs["num_classes"] = 0
    torch.manual_seed(seed)
    net = create_model(spec.architecture, kwargs, builder=spec.builder)
    gen = torch.Generator().manual_seed(seed + 1)
    _perturb(net, gen)
    return spec.architecture, kwargs, net.eval()


def hub_config(spec: EncoderSpec, kwargs: dict[str, Any], net: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` of a random-weight directory: for timm specs timm's layout
    (architecture, model_args, pretrained_cfg), for ``transformers`` specs the model config,
    for ``module`` specs the net's name; always a ``pathray`` block recording the model."""
    base = get_builder(spec.builder).hub_config(spec.architecture, kwargs, net)
    if spec.builder != "timm":
        return {**base, "pathray": {"model": spec.name, **extra}}
    p = spec.preprocess
    resize = p.resize_px if p.resize_px is not None else p.crop_px
    json_args = {k: v for k, v in kwargs.items() if is_json_value(v)}
    layer_args = {k: getattr(v, "__name__", None) or repr(v) for k, v in kwargs.items() if k not in json_args}
    return {
        **base,
        "global_pool": kwargs.get("global_pool", "token"),
        "model_args": json_args,
        "pretrained_cfg": {
            "tag": "pathray_random",
            "custom_load": False,
            "input_size": [3, p.crop_px, p.crop_px],
            "fixed_input_size": not kwargs.get("dynamic_img_size", False),
            "interpolation": p.interpolation,
            "crop_pct": p.crop_px / resize,
            "crop_mode": "center",
            "mean": list(p.mean),
            "std": list(p.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "pathray": {"model": spec.name, "layer_args_from_spec": layer_args, **extra},
    }


def write_random_weights(model: str, out_dir: str | os.PathLike, *, seed: int = 0, **arch_overrides: Any) -> Path:
    """Write a random init of ``model``'s exact architecture (optionally shrunk, e.g.
    ``depth=2``) to ``out_dir`` in hub layout: ``config.json`` + ``model.safetensors``.

    Returns ``out_dir``. ``load_encoder(EncoderConfig(model, weights=out_dir))`` rebuilds it.
    """
    from safetensors.torch import save_file

    spec = get_spec(model)
    arch, kwargs, net = random_model(spec, seed=seed, **arch_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    sd = to_release_layout(get_builder(spec.builder).to_release(net, own), spec.checkpoint_prefix)
    tmp = out / "model.safetensors.tmp"
    # one metadata entry: safetensors writes a map of several in hash order, so the file (and its
    # sha256, the weights fingerprint) would differ between two writes of the same tensors
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    cfg = hub_config(
        spec,
        kwargs,
        net,
        seed=seed,
        random_init=True,
        arch_overrides={k: v for k, v in arch_overrides.items() if not callable(v)},
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
