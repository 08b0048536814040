"""How much memory one slide may take in a slide encoder, and the refusal when it would not fit.

Slide encoders hold one slide's tiles at once. Rather than let an out-of-memory kill the actor
(and every slide queued on it), each encoder states a linear cost model (fixed bytes + bytes
per tile) and a slide whose estimate exceeds the memory free now is refused before any work
as :class:`~pathray.errors.SlideTooLargeForEncoderError` (a per-slide error row).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pathray.errors import SlideTooLargeForEncoderError


def available_memory_bytes(device: str) -> int:
    """Free memory for one slide: ``cuda`` free device memory; on CPU ``MemAvailable`` capped by
    the cgroup's remaining limit. ``PATHRAY_SLIDE_ENCODER_MEMORY_BYTES`` overrides both."""
    override = os.environ.get("PATHRAY_SLIDE_ENCODER_MEMORY_BYTES")
    if override:
        return int(float(override))
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = _meminfo_available()
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def admit(name: str, n_tiles: int, bytes_per_tile: int, fixed_bytes: int, device: str) -> None:
    """Raise :class:`SlideTooLargeForEncoderError` when ``fixed_bytes + bytes_per_tile * n_tiles``
    exceeds :func:`available_memory_bytes` on ``device``."""
    free = available_memory_bytes(device)
    limit = max(0, (free - fixed_bytes) // bytes_per_tile)
    if n_tiles > limit:
        raise SlideTooLargeForEncoderError(
            f"{n_tiles} tiles exceed {name}'s limit of {limit} tiles on {device} ({free / 2**30:.1f} GiB free, "
            f"~{bytes_per_tile // 1024} KiB per tile)",
            n_tiles=n_tiles,
            limit_tiles=limit,
        )
