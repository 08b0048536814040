"""Torch-side preprocessing equivalent to the cards' PIL/torchvision transforms.

``Resize(r) -> CenterCrop(c) -> ToTensor -> Normalize(mean, std)`` on a PIL image is
reproduced on a uint8 ``(N, H, W, 3)`` batch:

* a resize to the tile's own size is skipped, as PIL and torchvision do (identity);
* otherwise the resize is antialiased bilinear/bicubic on **uint8** data, which on CPU uses
  torch's uint8 kernels written after Pillow's resampling (measured: bilinear bit-exact,
  bicubic off by one grey level on < 0.01 % of pixels). On CUDA the resize runs in float32
  and is rounded back to the uint8 grid (off by one grey level on ~0.3 % of pixels);
* centre crop uses torchvision's offsets (``round((size - crop) / 2)``);
* ``ToTensor`` + ``Normalize`` are done in float32 in the same order (``/255``, ``-mean``, ``/std``),
  so an un-resized tile is bit-identical to the torchvision result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Preprocess


def _resize_u8(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased resize of a uint8 NCHW batch, result uint8."""
    if x.device.type == "cpu":
        try:
            return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - very old torch
            pass
    y = F.interpolate(x.float(), size=size, mode=mode, antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_shorter(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """torchvision ``Resize(size)`` semantics: shorter side to ``size``, aspect kept."""
    h, w = x.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) == (h, w):
        return x
    return _resize_u8(x, (new_h, new_w), mode)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop(size)`` (pads with zeros when the image is smaller)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        pad_l = (size - w) // 2 if w < size else 0
        pad_t = (size - h) // 2 if h < size else 0
        pad_r = (size - w + 1) // 2 if w < size else 0
        pad_b = (size - h + 1) // 2 if h < size else 0
        x = F.pad(x, (pad_l, pad_r, pad_t, pad_b), value=0)
        h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def preprocess_batch(tiles_nhwc_u8: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` tensor (any device) -> normalised float32 ``(N, 3, crop, crop)``."""
    if tiles_nhwc_u8.dtype != torch.uint8 or tiles_nhwc_u8.ndim != 4 or tiles_nhwc_u8.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) tiles, got {tuple(tiles_nhwc_u8.shape)} {tiles_nhwc_u8.dtype}")
    x = tiles_nhwc_u8.permute(0, 3, 1, 2)  # NCHW view
    if prep.resize_px is not None:
        x = resize_shorter(x.contiguous(), prep.resize_px, prep.interpolation)
    x = center_crop(x, prep.crop_px)
    x = x.float().div_(255.0)
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
