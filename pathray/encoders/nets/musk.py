"""MUSK's image tower (Xiang et al., Nature 2025): the vision path of a BEiT-3 multiway
transformer (torchscale), in the parameter layout of the MUSK model (``xiangjx/musk``
``model.safetensors``, keys under ``beit3.``).

Official code: ``musk/modeling.py`` of lilab-stanford/MUSK (``musk_large_patch16_384``: 24
layers, width 1024, 16 heads, FFN 4096, 384 px, patch 16) on its vendored torchscale. An image
alone runs every multiway module's ``A`` (vision) expert: a sub-LayerNorm ("subln")
pre-norm encoder, whose attention output and FFN hidden layer are layer-normalised again,
position embeddings (Fairseq style, rows from 2) added to ``[CLS] + patches``, and a final
LayerNorm. The embedding is ``model(image=x, with_head=False, out_norm=False,
return_global=True)[0]``: with ``multiscale=False`` the [CLS] token (1024-d); with
``multiscale=True`` (``ms_aug=True``, the README's choice for linear probes and MIL) the
[CLS] token concatenated with the mean [CLS] of the four 384-px quarters of the image upsampled
bicubically to 768 px (``musk/utils.py`` MultiScaleForward, scales (1, 2)): 2048-d.
The ``B`` (text) experts, text embedding, heads and mask token are not part of this network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import register


class VisionA(nn.Module):
    """A multiway module's vision expert, under the key ``A`` as in torchscale's MultiwayNetwork."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.A = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)


class VisionEmbedding(nn.Module):
    def __init__(self, img_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"MUSK takes {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        x = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class SublnAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.scaling = (dim // heads) ** -0.5
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (VisionA(nn.Linear(dim, dim)) for _ in range(4))
        self.inner_attn_ln = VisionA(nn.LayerNorm(dim, eps=eps))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2).reshape(b * self.heads, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(self.q_proj(x)) * self.scaling, self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        attn = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1, dtype=torch.float32).type_as(q)
        out = torch.bmm(attn, v).view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(self.inner_attn_ln(out))


class SublnFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).type_as(x)))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.self_attn = SublnAttention(dim, heads, eps)
        self.self_attn_layer_norm = VisionA(nn.LayerNorm(dim, eps=eps))
        self.ffn = VisionA(SublnFFN(dim, hidden, eps))
        self.final_layer_norm = VisionA(nn.LayerNorm(dim, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class Encoder(nn.Module):
    def __init__(self, n_positions: int, dim: int, depth: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.embed_positions = VisionA(nn.Embedding(n_positions, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden, eps) for _ in range(depth))
        self.layer_norm = VisionA(nn.LayerNorm(dim, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.embed_positions.A.weight[2 : 2 + x.shape[1]].unsqueeze(0)  # Fairseq: positions start at 2
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


@dataclass(frozen=True)
class MuskVisionConfig:
    """The official vision path's hyper-parameters (defaults: ``_get_large_config(img_size=384)``)."""

    img_size: int = 384
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    multiscale: bool = False  # also the 2x scale's [CLS] (MUSK's ms_aug)


class MuskVision(nn.Module):
    """MUSK's vision path; ``forward`` returns the [CLS] embedding (``multiscale``: + the 2x scale's)."""

    def __init__(self, config: MuskVisionConfig = MuskVisionConfig()) -> None:
        super().__init__()
        eps = 1e-5  # torchscale EncoderConfig layernorm_eps
        self.multiscale = config.multiscale
        self.vision_embed = VisionEmbedding(config.img_size, config.patch_size, config.embed_dim)
        n_positions = (config.img_size // config.patch_size) ** 2 + 1 + 2
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.encoder = Encoder(n_positions, config.embed_dim, config.depth, config.num_heads, hidden, eps)

    def cls_embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.vision_embed(x))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_embedding(x)
        if not self.multiscale:
            return cls
        b, c, size, _ = x.shape
        up = F.interpolate(x.to(torch.float32), size=2 * size, mode="bicubic").to(x.dtype)
        # (nh nw b) order of musk.utils.split_chessboard, one batch of b per quarter as its batched_forward
        quarters = up.reshape(b, c, 2, size, 2, size).permute(2, 4, 0, 1, 3, 5).reshape(4, b, c, size, size)
        up_cls = torch.stack([self.cls_embedding(q) for q in quarters], dim=1)  # (b, 4, dim)
        return torch.cat([cls, up_cls.mean(dim=1)], dim=-1)


@register("musk_large_patch16_384_vision")
def musk_large_patch16_384_vision(**kwargs) -> MuskVision:
    """``MuskVision(MuskVisionConfig(**kwargs))``."""
    return MuskVision(MuskVisionConfig(**kwargs))
