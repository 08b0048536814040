"""What a model costs per tile: FLOPs counted on the ``meta`` device (no weights, no memory),
and the tile rate a GPU would reach at a given model-FLOPs utilisation (MFU).

The rate is a *target* for planning (``pathray embed --dry-run`` prints GPU-hours with it,
labelled as such), never a measurement: measured figures come from ``benchmarks/encoders.py``.
"""

from __future__ import annotations

import functools

import torch

from .build import create_model
from .builders import get_builder
from .registry import EncoderSpec, get_spec

#: dense bf16 peak of one H100 SXM / H200 (TFLOP/s), the reference GPU of the targets
H100_BF16_PEAK_TFLOPS = 989.4
TARGET_MFU = 0.5


def flops_per_tile(spec: EncoderSpec, architecture: str | None = None, kwargs: dict | None = None) -> float:
    """Model FLOPs for one ``input_px`` tile (multiply-adds x 2), counted by
    ``FlopCounterMode`` on a meta-device copy, where attention decomposes into matmuls it sees
    (the fused CPU attention kernel is not counted). Preprocessing is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    if spec.builder == "transformers" and kwargs:
        merged = dict(kwargs)  # resolved kwargs of a loaded encoder: {"config": ..., "init": ...}
    else:
        merged = {**spec.model_kwargs, **(kwargs or {})}
    if spec.builder == "timm":
        merged["num_classes"] = 0
    model = create_model(architecture or spec.architecture, merged, meta=True, builder=spec.builder).eval()
    x = torch.empty(2, 3, spec.input_px, spec.input_px, device="meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        get_builder(spec.builder).pool(model, x, spec.pooling)
    return counter.get_total_flops() / 2


@functools.cache
def target_tiles_per_s(model: str, peak_tflops: float = H100_BF16_PEAK_TFLOPS, mfu: float = TARGET_MFU) -> float:
    """Tiles/s of registered ``model`` on one GPU of ``peak_tflops`` at ``mfu`` (a target)."""
    return mfu * peak_tflops * 1e12 / flops_per_tile(get_spec(model))
