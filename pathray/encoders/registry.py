"""Encoder specs as data: one frozen :class:`EncoderSpec` per supported model.

Each spec records what is needed to rebuild a model card's recipe exactly: the timm
architecture and its keyword arguments, where the weights live, the preprocessing
(resize, centre crop, mean/std) and how the embedding is pooled from the token sequence.
Values follow the model cards / hub configs of each model (see ``docs/models.md``).

``timm:<architecture>`` names any timm architecture (a user's own backbone); its spec is
derived on the fly from timm's default pretrained config for that architecture.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import GluMlp, SwiGLUPacked

from pathray.errors import UnknownModelError

from .builders import POOLINGS_BY_BUILDER

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Torch-side equivalent of ``Resize(resize_px) -> CenterCrop(crop_px) -> ToTensor -> Normalize``.

    ``resize_px`` is the target of the *shorter* side (torchvision semantics; tiles are
    square so both sides). ``resize_px=None`` means no resize (the card feeds the tile as is).
    """

    resize_px: int | None
    crop_px: int
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" (antialiased, PIL-equivalent)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: "pil": the card resizes a PIL image (Pillow's algorithm, reproduced exactly);
    #: "torch": the card resizes a uint8 tensor (torchvision v2 after ToImage)
    resize_backend: str = "pil"

    def describe(self) -> str:
        parts = []
        if self.resize_px is not None:
            parts.append(f"Resize({self.resize_px}, {self.interpolation})")
        parts.append(f"CenterCrop({self.crop_px})")
        parts.append(f"mean={tuple(round(m, 6) for m in self.mean)} std={tuple(round(s, 6) for s in self.std)}")
        return " -> ".join(parts)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything pathray needs to know about one encoder (pure data)."""

    name: str
    architecture: str                      # timm architecture / transformers class / pathray net name
    model_kwargs: dict[str, Any]           # exact constructor kwargs of the card (see ``builder``)
    embed_dim: int                         # dimension of the pooled embedding
    input_px: int                          # side of the image fed to the network
    native_mpp: float                      # µm/px the model was trained at (default tiling)
    preprocess: Preprocess
    pooling: str = "cls"                   # see pathray.encoders.builders (register tokens never pooled)
    hf_hub_id: str | None = None           # default weight source ("org/name" on the HF hub)
    gated: bool = False                    # hub repo needs an access request + token
    weights_url: str | None = None         # alternative direct download (e.g. GitHub release)
    license: str = ""
    family: str = ""                       # human-readable architecture label (ViT-L/16, ...)
    card_params_m: float | None = None     # parameter count in millions stated by the card
    notes: str = ""
    #: the card's reason when its checkpoint's position-embedding grid is for another image
    #: size and must be resampled on load (empty: weights must fit exactly)
    pos_embed_resample: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: side in pixels, at ``native_mpp``, of the tile the card's preprocessing expects (the size
    #: its Resize leaves unchanged); ``None``: ``input_px`` (generic timm backbones, no card)
    native_tile_px: int | None = None
    tile_source: str = ""                  # where the native tile fact comes from (docs/models.md)
    #: "timm" | "transformers" | "module" (pathray.encoders.builders)
    builder: str = "timm"
    #: key prefix of the network's weights in the published checkpoint (e.g. "visual.")
    checkpoint_prefix: str = ""
    #: key prefixes of the published checkpoint that are not the tile encoder (e.g. a text tower)
    checkpoint_ignore: tuple[str, ...] = ()
    #: where the architecture and pooling facts come from (official code, card)
    source: str = ""

    def __post_init__(self) -> None:
        poolings = POOLINGS_BY_BUILDER.get(self.builder)
        if poolings is None:
            raise ValueError(f"{self.name}: builder must be one of {sorted(POOLINGS_BY_BUILDER)}, got {self.builder!r}")
        if self.pooling not in poolings:
            raise ValueError(f"{self.name}: pooling for builder {self.builder} must be one of {poolings}, "
                             f"got {self.pooling!r}")

    @property
    def tile_px(self) -> int:
        """Tile side (px at ``native_mpp``) this model's preprocessing expects: the default tiling."""
        return self.native_tile_px or self.input_px

    def callable_model_args(self) -> dict[str, Any]:
        """The kwargs that are classes/callables (layer types) and must come from code."""
        return {k: v for k, v in self.model_kwargs.items() if not _is_json_value(v)}


def _is_json_value(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_json_value(x) for k, x in v.items())
    return False


# --------------------------------------------------------------------------------------
# The zoo. Keyword arguments are the cards' own (timm.create_model / VisionTransformer).
# --------------------------------------------------------------------------------------
_CC_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial, academic research; no redistribution)"
_UNI_TILE = "card: transforms.Resize(224) -> CenterCrop(224) (also timm resolve_data_config of the hub weights)"

_SPECS: list[EncoderSpec] = [
    EncoderSpec(
        name="uni",
        family="ViT-L/16",
        architecture="vit_large_patch16_224",
        model_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        embed_dim=1024,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=_UNI_TILE,
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        pooling="cls",
        hf_hub_id="MahmoodLab/UNI",
        gated=True,
        license=_CC_NC_ND,
    ),
    EncoderSpec(
        name="uni2-h",
        family="ViT-H/14, 8 registers, SwiGLU",
        architecture="vit_giant_patch14_224",
        model_kwargs=dict(
            img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
            mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked,
            act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True,
        ),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source=_UNI_TILE,
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear"),
        pooling="cls",
        hf_hub_id="MahmoodLab/UNI2-h",
        gated=True,
        license=_CC_NC_ND,
        card_params_m=681,  # HF model card "Params (M): 681"
    ),
    EncoderSpec(
        name="prov-gigapath",
        family="ViT-g/14 (patch 16) tile encoder",
        architecture="vit_giant_patch14_dinov2",
        model_kwargs=dict(
            img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
            init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
        ),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=256,
        tile_source="card: Resize(256, bicubic) -> CenterCrop(224); official tiling: 256-px tiles at 0.5 µm/px"
                    " (gigapath/pipeline.py tile_one_slide; slide encoder tile_size=256)",
        preprocess=Preprocess(resize_px=256, crop_px=224, interpolation="bicubic"),
        pooling="cls",
        hf_hub_id="prov-gigapath/prov-gigapath",
        gated=True,
        license="Prov-GigaPath model licence: research use only, not for clinical or commercial deployment",
        notes="card preprocessing is Resize(256, bicubic) + CenterCrop(224): 256 px tiles avoid resampling",
    ),
    EncoderSpec(
        name="virchow",
        family="ViT-H/14, SwiGLU",
        architecture="vit_huge_patch14_224",
        model_kwargs=dict(
            img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
            dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
        ),
        embed_dim=2560,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="card: \"Image size: 224 x 224\", tiles sampled at 0.5 µm/px; transform from the hub pretrained_cfg",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bicubic"),
        pooling="cls+mean_patch",
        hf_hub_id="paige-ai/Virchow",
        gated=True,
        license="Apache-2.0 with additional terms (institutional e-mail; no clinical use)",
        card_params_m=632,
    ),
    EncoderSpec(
        name="virchow2",
        family="ViT-H/14, 4 registers, SwiGLU",
        architecture="vit_huge_patch14_224",
        model_kwargs=dict(
            img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
            dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
        ),
        embed_dim=2560,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="hub pretrained_cfg transform Resize(224) -> CenterCrop(224), input 224 x 224",
        preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bicubic"),
        pooling="cls+mean_patch",
        hf_hub_id="paige-ai/Virchow2",
        gated=True,
        license=_CC_NC_ND,
        card_params_m=632,
        notes="mixed-magnification pretraining (5x-40x); 0.5 µm/px is the default tiling",
    ),
    EncoderSpec(
        name="h-optimus-0",
        family="ViT-g/14, 4 registers, SwiGLU",
        architecture="vit_giant_patch14_reg4_dinov2",
        model_kwargs=dict(
            patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
            mlp_layer=functools.partial(GluMlp, act_layer=torch.nn.SiLU, gate_last=False),
            act_layer=torch.nn.SiLU, reg_tokens=4, no_embed_class=True, img_size=224, num_classes=0, in_chans=3,
        ),
        embed_dim=1536,
        input_px=224,
        native_mpp=0.5,
        native_tile_px=224,
        tile_source="card: \"expects images of size 224x224, extracted at 0.5 microns per pixel\"",
        preprocess=Preprocess(
            resize_px=224, crop_px=224, interpolation="bicubic",
            mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        ),
        pooling="cls",
        hf_hub_id="bioptimus/H-optimus-0",
        gated=True,
        weights_url="https://public-bioptimus-eu-west-3.s3.eu-west-3.amazonaws.com/h-optimus-v0/checkpoint.pth",
        license="Apache-2.0",
        notes="card feeds 224x224 tiles at 0.5 µm/px without resizing; other tile sizes are resized (bicubic) to 224",
    ),
]

_KAIKO_RELEASE = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1/{}.pth"
_KAIKO_LICENSE = "Kaiko Non-Commercial Public License v1"
# the ViT-L/14 release is trained at 518 px (37x37 grid); the card's torch.hub loader builds it at
# 224 px and timm's checkpoint filter resamples the grid on load
_KAIKO_RESAMPLE = "kaiko ViT-L/14 release trained at 518 px, used at 224 px by its torch.hub loader"
for _short, _arch, _family, _dim, _extra, _mirror in [
    ("vits16", "vit_small_patch16_224", "ViT-S/16", 384, {}, "vit_small_patch16_224"),
    ("vits8", "vit_small_patch8_224", "ViT-S/8", 384, {}, "vit_small_patch8_224"),
    ("vitb16", "vit_base_patch16_224", "ViT-B/16", 768, {}, "vit_base_patch16_224"),
    ("vitb8", "vit_base_patch8_224", "ViT-B/8", 768, {}, "vit_base_patch8_224"),
    # torch.hub builds vit_large_patch14_reg4_dinov2 with a fresh pretrained_cfg, whose
    # default input size gives img_size=224 (not the DINOv2 default 518): say so explicitly.
    ("vitl14", "vit_large_patch14_reg4_dinov2", "ViT-L/14, 4 registers", 1024, {"img_size": 224},
     "vit_large_patch14_reg4_224"),
]:
    _SPECS.append(
        EncoderSpec(
            name=f"kaiko-{_short}",
            family=_family,
            architecture=_arch,
            model_kwargs=dict(dynamic_img_size=True, num_classes=0, **_extra),
            embed_dim=_dim,
            input_px=224,
            native_mpp=0.5,
            native_tile_px=224,
            tile_source="card: v2.Resize(224) -> v2.CenterCrop(224)",
            preprocess=Preprocess(resize_px=224, crop_px=224, interpolation="bilinear",
                                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_backend="torch"),
            pooling="cls",
            hf_hub_id=f"1aurent/{_mirror}.kaiko_ai_towards_large_pathology_fms",
            gated=False,
            weights_url=_KAIKO_RELEASE.format(_short),
            license=_KAIKO_LICENSE,
            notes=f"card: torch.hub.load('kaiko-ai/towards_large_pathology_fms', '{_short}') (weights from the"
            " GitHub release URL); hub id is the community timm mirror; 0.5 µm/px default tiling",
            pos_embed_resample=_KAIKO_RESAMPLE if _short == "vitl14" else "",
        )
    )

REGISTRY: dict[str, EncoderSpec] = {s.name: s for s in _SPECS}

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
    return (f"models expect different native tiles ({expects}); this run cuts one tiling, {tile_px} px at "
            f"{target_mpp:g} µm/px, for every model, and each model's own Resize/CenterCrop is applied to those "
            f"tiles, so {', '.join(others)} see(s) a field of view other than the card's. Run such models in "
            "separate stores (one --out per tiling) to give each its native tile.")


def list_models() -> list[str]:
    """Registered model names (the generic ``timm:<architecture>`` entry is not listed)."""
    return list(REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    """Spec of a registered model, or a generic spec for ``timm:<architecture>``."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX):])
    known = ", ".join(list_models())
    raise UnknownModelError(f"unknown model {name!r}; known models: {known}, or timm:<architecture>")


@functools.lru_cache(maxsize=64)
def _timm_spec(architecture: str) -> EncoderSpec:
    import timm

    if not architecture or not timm.is_model(architecture):
        known = ", ".join(list_models())
        raise UnknownModelError(
            f"unknown timm architecture {architecture!r} (see timm.list_models()); "
            f"registered models: {known}"
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


def spec_from_pretrained_cfg(name: str, architecture: str, model_kwargs: dict[str, Any],
                             cfg: dict[str, Any], embed_dim: int = 0) -> EncoderSpec:
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
            resize_px=int(crop / crop_pct), crop_px=crop, interpolation=interp,
            mean=tuple(cfg.get("mean") or IMAGENET_MEAN), std=tuple(cfg.get("std") or IMAGENET_STD),
        ),
        pooling="cls",  # the model's own head (num_classes=0 -> pooled features)
        hf_hub_id=cfg.get("hf_hub_id") or None,
        license=str(cfg.get("license") or "see the architecture's weights"),
        notes="generic timm backbone: embedding = model(x) with num_classes=0",
    )
