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


class ResNet50Trunc(nn.Module):
    """ResNet-50 through ``layer3`` + global average pool: ``(N, 3, H, W) -> (N, 1024)``."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            full = timm.create_model("resnet50", pretrained=False, num_classes=0)
        self.conv1, self.bn1, self.act1, self.maxpool = full.conv1, full.bn1, full.act1, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
        self.num_features = 1024

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@register("resnet50_trunc")
def resnet50_trunc() -> ResNet50Trunc:
    return ResNet50Trunc()
