"""KEEP's image embedding (Zhou et al., "A Knowledge-enhanced Pathology Vision-language Foundation
Model for Cancer Diagnosis"), in the parameter layout of the ``Astaxanthin/KEEP`` release.

Official code: ``KEEPModel`` (the hub's remote code, reproduced in MAGIC-AI4Med/KEEP
``quick_start/keep_inference.py``): ``visual`` is timm's ``vit_large_patch16_224`` (img_size 224,
patch 16, LayerScale ``init_values=1e-5``, ``num_classes=0``, ``dynamic_img_size=True``: the
[CLS] token after the final norm), ``visual_head`` is ``Linear(1024, 768) -> GELU ->
Linear(768, 768)``, and ``encode_image`` returns the L2-normalised head output (768-d). The text
tower (``text.``, a BERT) and ``logit_scale`` are not part of this network.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from . import register


class KeepVision(nn.Module):
    """``forward(x) = normalize(visual_head(visual(x)))``, as ``KEEPModel.encode_image``."""

    def __init__(self, projection_dim: int = 768, depth: int = 24, embed_dim: int = 1024) -> None:
        super().__init__()
        self.visual = timm.create_model(
            "vit_large_patch16_224",
            pretrained=False,
            img_size=224,
            patch_size=16,
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=True,
            depth=depth,
            embed_dim=embed_dim,
        )
        self.visual_head = nn.Sequential(
            nn.Linear(self.visual.num_features, projection_dim), nn.GELU(), nn.Linear(projection_dim, projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_head(self.visual(x)), dim=-1)


@register("keep_vit_large_patch16_224")
def keep_vit_large_patch16_224(**kwargs) -> KeepVision:
    return KeepVision(**kwargs)
