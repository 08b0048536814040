"""Torch-side preprocessing equivalent to the cards' PIL/torchvision transforms.

``Resize(r) -> CenterCrop(c) -> ToTensor -> Normalize(mean, std)`` is reproduced on a uint8
``(N, H, W, 3)`` batch, on the encoder's device:

* a resize to the tile's own size is skipped, as PIL and torchvision do (identity);
* ``resize_backend="pil"`` (cards that resize a PIL image): Pillow's resampling algorithm
  (``ImagingResample``: separable horizontal-then-vertical pass, filter weights normalised
  and rounded to 22-bit fixed point, each pass rounded and clipped to uint8) re-implemented
  with exact integer arithmetic in float64 matmuls. Bit-identical to Pillow on CPU and CUDA;
* ``resize_backend="torch"`` (cards whose transforms resize a uint8 *tensor*, e.g.
  torchvision ``v2`` after ``ToImage``): torch's antialiased uint8 kernel, as torchvision
  calls it (identical on CPU; on CUDA, where no uint8 kernel exists, float32 + rounding:
  off by one grey level on ~0.3 % of pixels);
* centre crop uses torchvision's offsets (``round((size - crop) / 2)``);
* ``ToTensor`` + ``Normalize`` run in float32 in torchvision's order (``/255``, ``-mean``,
  ``/std``), so the whole chain is bit-identical to the card's transform.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .spec import Preprocess

# --- Pillow's resampling, exactly ------------------------------------------------------
_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c


def _pil_filter(mode: str):
    if mode == "bilinear":

        def f(x: float) -> float:
            x = abs(x)
            return 1.0 - x if x < 1.0 else 0.0

        return f, 1.0
    if mode == "bicubic":
        a = -0.5

        def f(x: float) -> float:
            x = abs(x)
            if x < 1.0:
                return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
            if x < 2.0:
                return (((x - 5) * x + 8) * x - 4) * a
            return 0.0

        return f, 2.0
    raise ValueError(f"unsupported interpolation {mode!r} (bilinear or bicubic)")


@functools.lru_cache(maxsize=64)
def _pil_weights(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """(out, in) matrix of Pillow's fixed-point filter weights (integers, as float64)."""
    filt, support = _pil_filter(mode)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ss = 1.0 / filterscale
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = [filt((x + xmin - center + 0.5) * ss) for x in range(xmax - xmin)]
        total = sum(k)
        if total != 0.0:
            k = [v / total for v in k]
        for i, v in enumerate(k):  # C casts truncate toward zero
            w[xx, xmin + i] = float(int(v * (1 << _PRECISION_BITS) + (0.5 if v >= 0 else -0.5)))
    return w


def _pil_pass(x: torch.Tensor, weights: np.ndarray, dim: int) -> torch.Tensor:
    """One Pillow pass along ``dim`` (-1: width, -2: height) of a float64 integer-valued batch."""
    k = torch.from_numpy(weights).to(x.device)
    if dim == -1:
        acc = torch.matmul(x, k.T)
    else:
        acc = torch.matmul(k, x)
    half = float(1 << (_PRECISION_BITS - 1))
    # (acc + 2^21) >> 22 with clip8: exact, all values are integers < 2^53
    return torch.floor((acc + half) / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def _resize_pil(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    out_h, out_w = size
    y = x.to(torch.float64)
    if out_w != w:
        y = _pil_pass(y, _pil_weights(w, out_w, mode), -1)
    if out_h != h:
        y = _pil_pass(y, _pil_weights(h, out_h, mode), -2)
    return y.to(torch.uint8)


def _resize_torch(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    y = F.interpolate(x.float(), size=size, mode=mode, antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _resize_u8(x: torch.Tensor, size: tuple[int, int], mode: str, backend: str = "pil") -> torch.Tensor:
    """Antialiased resize of a uint8 NCHW batch, result uint8."""
    if backend == "pil":
        return _resize_pil(x, size, mode)
    if backend == "torch":
        return _resize_torch(x, size, mode)
    raise ValueError(f"unknown resize backend {backend!r}")


def resize_shorter(x: torch.Tensor, size: int, mode: str, backend: str = "pil") -> torch.Tensor:
    """torchvision ``Resize(size)`` semantics: shorter side to ``size``, aspect kept."""
    h, w = x.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) == (h, w):
        return x
    return _resize_u8(x, (new_h, new_w), mode, backend)


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
    return x[..., top : top + size, left : left + size]


def preprocess_batch(tiles_nhwc_u8: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` tensor (any device) -> normalised float32 ``(N, 3, crop, crop)``."""
    if tiles_nhwc_u8.dtype != torch.uint8 or tiles_nhwc_u8.ndim != 4 or tiles_nhwc_u8.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) tiles, got {tuple(tiles_nhwc_u8.shape)} {tiles_nhwc_u8.dtype}")
    x = tiles_nhwc_u8.permute(0, 3, 1, 2)  # NCHW view
    if prep.resize_px is not None:
        x = resize_shorter(x.contiguous(), prep.resize_px, prep.interpolation, prep.resize_backend)
    x = center_crop(x, prep.crop_px)
    x = x.float().div_(255.0)
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
