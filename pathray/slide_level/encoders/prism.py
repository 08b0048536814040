"""PRISM slide encoder (Paige, HF ``paige-ai/Prism``): the Perceiver resampler over Virchow tiles.

Architecture: the official ``perceiver.py`` / ``configuring_prism.py`` as redistributed in
github.com/clemsgrs/prism-embedder (``prism_embedder/models/prism``; ``config.json`` there is the
hub repo's). ``PerceiverResampler``: 513 learned latent queries (1280-d; query 0 becomes the
slide embedding, 1-512 the image latents the text decoder reads) refined by 8 Perceiver layers,
each a cross-attention from the latents to the tiles (1 head, ``c_norm=False``: the 2560-d tile
embeddings enter unnormalised) + a GEGLU feed-forward, then 6 pre-norm self-attention blocks (8
heads, no biases) with GEGLU feed-forwards. Weights are shared across layers as the official
``share_xattn_start_layer=1`` / ``share_tf_start_layer=0`` say: layers 2-7 reuse layer 1's
cross-attention block *and the key/value projection of the tiles layer 1 computed*; layers 1-7
reuse layer 0's self-attention stack.

**Slide embedding.** ``Prism.slide_representations(tiles)["image_embedding"]`` (what TRIDENT's
``prism`` and prism-embedder return), ``(1280,)``: ``cls_norm`` (LayerNorm) of latent 0. The
official single-slide call builds a float tile mask of ones, which ``scaled_dot_product_attention``
adds to every cross-attention score: a shift softmax removes, which pathray applies all the
same (as a broadcast scalar) so that its arithmetic is the official one, rounding included.

**Tiles.** Virchow (v1) tile embeddings, 2560-d = class token ++ mean of the patch tokens
(store model ``virchow``), 224 x 224-px tiles at 20x (0.5 µm/px): the hub card, prism-embedder
(``spacing: 0.5``, ``tile_size: 224``, Virchow ``mode="full"``) and TRIDENT
(``--patch_size 224 --mag 20``).

**Weights.** ``model.safetensors`` of the gated hub repo ``paige-ai/Prism``: the whole ``Prism``
model; the resampler's entries (``image_resampler.``) are loaded strictly, the BioGPT text
decoder and the contrastive heads (``text_decoder.``, ``img_to_latents.``, ``text_to_latents.``,
``temperature``) are not used for slide embeddings and are set aside (TRIDENT drops the decoder
too). A shared tensor may be stored under any of its names (safetensors keeps one per storage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .release import Release, TileSetEncoder, random_net, resolve_weights, unique_state

#: memory model of one slide (pathray.slide_level.encoders.memory.admit): twice the measured working
#: memory per tile (docs/bench/slide_encoders_abmil.md: 16.8 MB per 1,000 tiles on CPU fp32) plus
#: the tile embeddings themselves (2560 float32), over a fixed allowance
BYTES_PER_TILE = 48 * 1024
FIXED_BYTES = 512 * 1024**2

RELEASE = Release(
    architecture="prism_perceiver_resampler",
    filename="model.safetensors",
    hub_repo="paige-ai/Prism",
    obtain="request access at https://huggingface.co/paige-ai/Prism and download model.safetensors",
    key_prefix="image_resampler.",
    ignored_prefixes=("text_decoder.", "img_to_latents.", "text_to_latents.", "temperature"),
)
PROVENANCE: dict[str, Any] = {
    "implementation": "pathray.slide_level.encoders.prism (plain PyTorch, fp32; TRIDENT runs fp16, prism-embedder "
    "fp16 autocast)",
    "output": "official slide_representations()['image_embedding']: cls_norm(latent 0) (1280-d)",
    "tile_model": "virchow (v1, class token ++ mean patch token, 2560-d), 224-px tiles at 20x (0.5 µm/px)",
}


@dataclass(frozen=True)
class PerceiverConfig:
    """``perceiver_config`` of the hub ``config.json`` (defaults: the released values)."""

    latent_seq: int = 512
    latent_dim: int = 1280
    context_dim: int = 2560
    mhsa_heads: int = 8
    perceiver_depth: int = 8
    transformer_depth: int = 6
    share_xattn_start_layer: int = 1
    share_tf_start_layer: int = 0


class FeedForward(nn.Module):
    """Pre-norm GEGLU MLP: ``net.2(a * gelu(g))`` with ``a, g`` the halves of ``net.0(norm(x))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.Identity(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gates = self.net[0](self.norm(x)).chunk(2, dim=-1)
        return self.net[2](a * F.gelu(gates))


class CrossAttention(nn.Module):
    """One-head cross-attention of the latents (normalised) to the raw tile embeddings."""

    def __init__(self, query_dim: int, context_dim: int):
        super().__init__()
        self.x_norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim, bias=False)

    def keys_values(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, context_dim)`` -> keys, values ``(N, query_dim)`` (the official ``kvt``)."""
        k, v = self.to_kv(tiles).chunk(2, dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.to_q(self.x_norm(x))
        k, v = kv
        mask = q.new_ones(1, 1)  # the official single-slide float mask of ones: +1 on every score
        with sdpa_kernel(SDPBackend.MATH):  # the official kernel choice
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
        return self.to_out(out)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention without biases (official ``MHSA``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)[None]
        with sdpa_kernel(SDPBackend.MATH):
            return self.mha(h, h, h, need_weights=False)[0][0]


def _layers(cfg: PerceiverConfig) -> nn.ModuleList:
    """The 8 layers, later ones holding the very modules of earlier ones (official sharing)."""
    layers: list[nn.ModuleDict] = []
    for i in range(cfg.perceiver_depth):
        xattn = (
            nn.ModuleDict({"xattn": CrossAttention(cfg.latent_dim, cfg.context_dim), "ff": FeedForward(cfg.latent_dim)})
            if i <= cfg.share_xattn_start_layer
            else layers[-1]["xattn"]
        )
        tf = (
            nn.ModuleList(
                [
                    nn.ModuleDict(
                        {"mhsa": SelfAttention(cfg.latent_dim, cfg.mhsa_heads), "ff": FeedForward(cfg.latent_dim)}
                    )
                    for _ in range(cfg.transformer_depth)
                ]
            )
            if i <= cfg.share_tf_start_layer
            else layers[-1]["tf"]
        )
        layers.append(nn.ModuleDict({"xattn": xattn, "tf": tf}))
    return nn.ModuleList(layers)


class PrismNet(nn.Module):
    """``PerceiverResampler`` with the official parameter names (``cls_norm``, ``img_norm``,
    ``perceiver.latents``, ``perceiver.layers.<i>.{xattn,tf}``); ``forward`` returns the slide embedding."""

    def __init__(self, config: PerceiverConfig = PerceiverConfig()):
        super().__init__()
        self.config = config
        self.in_dim = config.context_dim
        self.cls_norm = nn.LayerNorm(config.latent_dim)
        self.img_norm = nn.LayerNorm(config.latent_dim)  # image latents: for the text decoder only
        self.perceiver = nn.Module()
        self.perceiver.latents = nn.Parameter(torch.zeros(config.latent_seq + 1, config.latent_dim))
        self.perceiver.layers = _layers(config)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(N, 2560)`` -> ``(1280,)``: ``image_embedding`` of one slide."""
        x = self.perceiver.latents
        kv: tuple[torch.Tensor, torch.Tensor] | None = None
        for i, layer in enumerate(self.perceiver.layers):
            block = layer["xattn"]
            if i <= self.config.share_xattn_start_layer:  # later layers reuse the last keys/values
                kv = None  # free the previous layer's (N, 2 x 1280) first: at 100k tiles each is 1 GB
                kv = block["xattn"].keys_values(tiles)
            x = block["xattn"](x, kv) + x
            x = block["ff"](x) + x
            for sa in layer["tf"]:
                x = sa["mhsa"](x) + x
                x = sa["ff"](x) + x
        return self.cls_norm(x[0])


def from_weights(source: str | os.PathLike | None, device: str = "cpu") -> TileSetEncoder:
    """The PRISM slide encoder with ``source``: ``None`` (the hub repo's ``model.safetensors``),
    ``hf-hub:org/name[@rev]``, a ``model.safetensors`` file or a directory holding one."""
    return TileSetEncoder.load(PrismNet, RELEASE, resolve_weights(RELEASE, source), device, PROVENANCE)


def write_random_weights(
    directory: str | os.PathLike, seed: int = 0, config: PerceiverConfig = PerceiverConfig()
) -> Path:
    """Random weights of the resampler in the release layout: ``model.safetensors`` with
    ``image_resampler.``-prefixed keys, each shared tensor once (under its first name), plus a
    ``temperature`` entry as the full release has (set aside on loading)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"image_resampler.{k}": v for k, v in unique_state(random_net(lambda: PrismNet(config), seed)).items()}
    save_file({**state, "temperature": torch.tensor(2.6593)}, str(directory / RELEASE.filename))
    return directory / RELEASE.filename


def aggregator(weights: str | None, device: str) -> Any:
    """``AGGREGATORS["prism"]`` builder."""
    from pathray.slide_level.aggregators import SlideEncoderAggregator

    return SlideEncoderAggregator(from_weights(weights, device), (BYTES_PER_TILE, FIXED_BYTES, device))
