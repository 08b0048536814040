"""Peak memory of the attention-pooling slide encoders vs tiles per slide (CPU, fp32).

CHIEF, MADELEINE, FEATHER (gated attention-MIL) and PRISM (Perceiver resampler) hold no
N x N attention, so memory grows linearly with the tile count N; this measures how steeply.
For each encoder, random weights of the exact architecture are written once in the release
layout; then each (encoder, N) runs in a fresh subprocess through the production path
(``from_weights`` -> ``encoder(tiles)``) on N float32 tile embeddings:

* ``rss_before_mb``: resident memory with the weights loaded, the tiles in memory and one
  warm-up forward on a single tile done (so that weights mapped from the file are resident);
* ``forward_peak_mb``: the peak resident memory *during* the forward (the kernel's high-water
  mark ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call), so
  ``forward_extra_mb = forward_peak_mb - rss_before_mb`` is what the forward itself adds;
* ``tiles_mb``: the input itself (N x D x 4 bytes); ``forward_s``: wall time of the forward.

    python benchmarks/slide_encoders_abmil.py --tiles 1000 10000 50000 100000 \\
        --markdown docs/bench/slide_encoders_abmil.md

Linux only (``/proc``). One thread by default (``--threads``): the numbers are memory, not speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathray.slide_level.encoders import chief, feather, madeleine, prism  # noqa: E402

ENCODERS = {"chief": chief, "madeleine": madeleine, "feather": feather, "prism": prism}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_one(name: str, weights: str, n_tiles: int, threads: int) -> dict:
    """In this process: load ``name`` from ``weights``, embed ``n_tiles`` random tiles once."""
    torch.set_num_threads(threads)
    encoder = ENCODERS[name].from_weights(weights)
    tiles = np.random.default_rng(0).random((n_tiles, encoder.net.in_dim), dtype=np.float32) * 2 - 1
    encoder(tiles[:1])  # warm-up: weights paged in (safetensors maps the file), allocator and kernels ready
    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    out = encoder(tiles)
    forward_s = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    params = sum(p.numel() for p in encoder.net.parameters())
    return {
        "encoder": name,
        "tiles": n_tiles,
        "in_dim": encoder.net.in_dim,
        "out_dim": int(out.shape[0]),
        "params_m": params / 1e6,
        "tiles_mb": tiles.nbytes / 2**20,
        "rss_before_mb": rss_before / 1024,
        "forward_peak_mb": peak / 1024,
        "forward_extra_mb": (peak - rss_before) / 1024,
        "forward_s": forward_s,
    }


def peak_memory_table(encoders: list[str], tile_counts: list[int], threads: int = 1) -> list[dict]:
    """One row per (encoder, tile count), each measured in a fresh subprocess (see the module docstring)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in encoders:
            weights = ENCODERS[name].write_random_weights(Path(tmp) / name, seed=0)
            for n in tile_counts:
                cmd = [sys.executable, __file__, "--one", name, str(weights), str(n), "--threads", str(threads)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], threads: int) -> str:
    head = (
        "# Slide encoders (CHIEF, MADELEINE, FEATHER, PRISM): peak memory vs tiles per slide\n\n"
        f"CPU fp32, {threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        "random weights of the exact architectures loaded through `from_weights`. Produced by "
        "`benchmarks/slide_encoders_abmil.py` (method in its docstring). *before*: resident memory with weights "
        "and tiles loaded, after a 1-tile warm-up forward; *forward peak*: high-water mark during the forward; *extra*: peak - before.\n\n"
        "| encoder | params (M) | tiles | tiles (MB) | before (MB) | forward peak (MB) | extra (MB) | forward (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['encoder']} | {r['params_m']:.2f} | {r['tiles']:,} | {r['tiles_mb']:.0f} | "
        f"{r['rss_before_mb']:.0f} | {r['forward_peak_mb']:.0f} | {r['forward_extra_mb']:.0f} | "
        f"{r['forward_s']:.2f} |\n"
        for r in rows
    )
    return head + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--tiles", nargs="+", type=int, default=[1000, 10_000, 50_000, 100_000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--one", nargs=3, metavar=("ENCODER", "WEIGHTS", "TILES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.one[1], int(args.one[2]), args.threads)))
        return
    rows = peak_memory_table(args.encoders, args.tiles, args.threads)
    if args.markdown:
        args.markdown.write_text(markdown(rows, args.threads))


if __name__ == "__main__":
    main()
