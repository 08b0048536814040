"""CLAM's ``resnet50_trunc`` tile encoder: an ImageNet ResNet-50 cut after ``layer3``, global
average pooled (1024-d).

Official code: ``mahmoodlab/CLAM`` ``models/timm_wrapper.py`` (``TimmCNNEncoder``:
``timm.create_model("resnet50.tv_in1k", features_only=True, out_indices=(3,))`` ->
``AdaptiveAvgPool2d(1)``), and before it ``models/resnet_custom.py`` (``resnet50_baseline``:
the same layers, torchvision weights loaded with ``strict=False``). Both are torchvision's
ResNet-50 v1.5 (stride in the 3x3 convolution) through ``layer3``.

The network is timm's ``resnet50`` stem and first three stages, under the names
torchvision and timm give them (``conv1``, ``bn1``, ``layer1``..``layer3``), so a full
ResNet-50 checkpoint loads once its ``layer4.``/``fc.`` keys are set aside
(``EncoderSpec.checkpoint_ignore``), as CLAM's non-strict load does.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import register

_RESNET50_LAYERS = (3, 4, 6, 3)
_RESNET50_CHANNELS = (64, 128, 256, 512)


class ResNet50Trunc(nn.Module):
    """ResNet-50 through ``layer3`` + global average pool: ``(N, 3, H, W) -> (N, embed_dim)``.

    ``depth`` (blocks per stage, at most) and ``embed_dim`` (output width; every stage's width
    scales with it) only shrink the network for random-weight tests; the defaults are ResNet-50.
    """

    def __init__(self, depth: int | None = None, embed_dim: int = 1024) -> None:
        super().__init__()
        from timm.models.resnet import Bottleneck, ResNet

        layers = [n if depth is None else min(n, depth) for n in _RESNET50_LAYERS]
        channels = tuple(c * embed_dim // 1024 for c in _RESNET50_CHANNELS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            full = ResNet(Bottleneck, layers, num_classes=0, channels=channels, stem_width=channels[0])
        self.conv1, self.bn1, self.act1, self.maxpool = full.conv1, full.bn1, full.act1, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
        self.num_features = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@register("resnet50_trunc")
def resnet50_trunc(depth: int | None = None, embed_dim: int = 1024) -> ResNet50Trunc:
    return ResNet50Trunc(depth=depth, embed_dim=embed_dim)
