"""The data types of the encoder zoo: :class:`EncoderSpec` (one per model) and its
:class:`Preprocess`. Specs are pure data; the zoo's modules (``pathray.encoders.zoo``) hold them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    architecture: str  # timm architecture / transformers class / pathray net name
    model_kwargs: dict[str, Any]  # exact constructor kwargs of the card (see ``builder``)
    embed_dim: int  # dimension of the pooled embedding
    input_px: int  # side of the image fed to the network
    native_mpp: float  # µm/px the model was trained at (default tiling)
    preprocess: Preprocess
    pooling: str = "cls"  # see pathray.encoders.builders (register tokens never pooled)
    hf_hub_id: str | None = None  # default weight source ("org/name" on the HF hub)
    gated: bool = False  # hub repo needs an access request + token
    weights_url: str | None = None  # alternative direct download (e.g. GitHub release)
    license: str = ""
    family: str = ""  # human-readable architecture label (ViT-L/16, ...)
    card_params_m: float | None = None  # parameter count in millions stated by the card
    notes: str = ""
    #: the card's reason when its checkpoint's position-embedding grid is for another image
    #: size and must be resampled on load (empty: weights must fit exactly)
    pos_embed_resample: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: side in pixels, at ``native_mpp``, of the tile the card's preprocessing expects (the size
    #: its Resize leaves unchanged); ``None``: ``input_px`` (generic timm backbones, no card)
    native_tile_px: int | None = None
    tile_source: str = ""  # where the native tile fact comes from (docs/models.md)
    #: "timm" | "transformers" | "module" (pathray.encoders.builders)
    builder: str = "timm"
    #: key prefix of the network's weights in the published checkpoint (e.g. "visual.")
    checkpoint_prefix: str = ""
    #: key prefixes of the published checkpoint that are not the tile encoder (e.g. a text tower);
    #: entries with ``*`` are globs over the whole key (``*.B.*``)
    checkpoint_ignore: tuple[str, ...] = ()
    #: where the architecture and pooling facts come from (official code, card)
    source: str = ""

    def __post_init__(self) -> None:
        poolings = POOLINGS_BY_BUILDER.get(self.builder)
        if poolings is None:
            raise ValueError(f"{self.name}: builder must be one of {sorted(POOLINGS_BY_BUILDER)}, got {self.builder!r}")
        if self.pooling not in poolings:
            raise ValueError(
                f"{self.name}: pooling for builder {self.builder} must be one of {poolings}, got {self.pooling!r}"
            )

    @property
    def tile_px(self) -> int:
        """Tile side (px at ``native_mpp``) this model's preprocessing expects: the default tiling."""
        return self.native_tile_px or self.input_px

    def callable_model_args(self) -> dict[str, Any]:
        """The kwargs that are classes/callables (layer types) and must come from code."""
        return {k: v for k, v in self.model_kwargs.items() if not is_json_value(v)}


def is_json_value(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(is_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and is_json_value(x) for k, x in v.items())
    return False


# --------------------------------------------------------------------------------------
# The zoo. Keyword arguments are the cards' own (timm.create_model / VisionTransformer).
