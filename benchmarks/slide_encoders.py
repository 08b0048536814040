"""Slide encoders: peak memory and time per slide vs tiles per slide, with random full-size weights.

Each measurement runs in a fresh process: random weights of the exact architecture are
written in the release layout and loaded through the aggregator's own builder
(``pathray.slide_level.aggregators.build_aggregator``), then one synthetic slide of N tiles (a near-square
block of the encoder's tile lattice at 0.5 µm/px, random float32 features) is embedded.
Peak memory: on CPU the process's peak RSS during the call (``VmHWM`` reset through
``/proc/self/clear_refs`` just before it) minus the RSS before it, i.e. the working memory of
one slide on top of the resident weights; on CUDA ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the call. ``--layers K`` runs only the first K of the encoder's layers
(each layer allocates the same, so the peak is that of the whole model; the time is then
scaled by layers / K and marked as such) to measure large slides on a small machine.

Adding an encoder is one line in :data:`ENCODERS`: its aggregator name, the function writing
its random weights (into a directory; returns what ``--weights`` takes) and the attribute
path of its layer list.

    python benchmarks/slide_encoders.py --encoders titan --tiles 1000 10000 --markdown docs/bench/slide_encoders.md
    python benchmarks/slide_encoders.py --encoders titan --tiles 50000 100000 --layers 1 --markdown ... --append
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathray.slide_level.aggregators import SlideTiles, build_aggregator, get_aggregator  # noqa: E402


@dataclass(frozen=True)
class Bench:
    random_weights: str  # "module:function(directory, seed=0) -> weights path or file"
    layers: str  # attribute path, from the encoder object, of its nn.ModuleList of layers


ENCODERS: dict[str, Bench] = {
    "titan": Bench("pathray.slide_level.encoders.titan:write_random_weights", "net.blocks.modules_list"),
}


def _resolve(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def synthetic_slide(n_tiles: int, tile_px: int, dim: int) -> SlideTiles:
    """N tiles filling a near-square block of the lattice row by row, at 0.5 µm/px."""
    cols = math.ceil(math.sqrt(n_tiles))
    idx = np.arange(n_tiles)
    step = tile_px * 1.0  # level-0 px of one tile at 0.5 µm/px on a 0.5 µm/px slide
    features = np.random.default_rng(0).random((n_tiles, dim), dtype=np.float32) * 2 - 1
    return SlideTiles(
        "bench", features, (idx % cols * step).astype(np.int64), (idx // cols * step).astype(np.int64), 0.5
    )


def measure_one(name: str, n_tiles: int, device: str, layers: int | None) -> dict:
    """One (encoder, tiles) measurement in this process."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    os.environ["PATHRAY_SLIDE_ENCODER_MEMORY_BYTES"] = str(2**50)  # measure, never refuse
    spec, bench = get_aggregator(name), ENCODERS[name]
    with tempfile.TemporaryDirectory() as tmp:
        weights = _resolve(bench.random_weights)(tmp)
        aggregator = build_aggregator(spec, str(weights), device)
    layer_list = aggregator.encoder
    for attr in bench.layers.split("."):
        layer_list = getattr(layer_list, attr)
    total_layers = len(layer_list)
    if layers:
        del layer_list[layers:]
    slide = synthetic_slide(n_tiles, spec.tiles.tile_px if spec.tiles else 256, spec.input_dim or 768)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        before = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    out = aggregator(slide)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_kib("VmHWM") * 1024
    ran = len(layer_list)
    return {
        "encoder": name,
        "tiles": n_tiles,
        "device": device,
        "layers_run": ran,
        "layers": total_layers,
        "peak_bytes": peak - before,
        "resident_bytes": before,
        "seconds": seconds * total_layers / ran,
        "time_scaled": ran != total_layers,
        "out_shape": list(out.shape),
        "finite": bool(np.isfinite(out).all()),
        "estimate_bytes": _estimate(name, n_tiles),
    }


def _estimate(name: str, n_tiles: int) -> int | None:
    """The encoder's own admission estimate (bytes for one slide), if it publishes one."""
    module = importlib.import_module(ENCODERS[name].random_weights.partition(":")[0])
    if hasattr(module, "FIXED_BYTES") and hasattr(module, "BYTES_PER_TOKEN"):
        return module.FIXED_BYTES + module.BYTES_PER_TOKEN * n_tiles
    return None


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.encoders:
        for n in args.tiles:
            cmd = [sys.executable, __file__, "--one", name, str(n), "--device", args.device]
            cmd += ["--layers", str(args.layers)] if args.layers else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"encoder": name, "tiles": n, "device": args.device, "error": proc.stderr.strip()[-300:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], header: bool) -> str:
    gib = 2**30
    lines = (
        [
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, "
            f"{os.environ.get('BENCH_THREADS', '1')} thread(s), fp32.",
            "",
            "| encoder | tiles | device | layers run | peak working memory (GiB) | estimate (GiB) | s / slide |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        if header
        else []
    )
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['encoder']} | {r['tiles']:,} | {r['device']} | | failed: {r['error'][:80]} | | |")
            continue
        est = f"{r['estimate_bytes'] / gib:.2f}" if r.get("estimate_bytes") else ""
        secs = f"{r['seconds']:.1f}" + (" (scaled)" if r["time_scaled"] else "")
        lines.append(
            f"| {r['encoder']} | {r['tiles']:,} | {r['device']} | {r['layers_run']} of {r['layers']} | "
            f"{r['peak_bytes'] / gib:.2f} | {est} | {secs} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=sorted(ENCODERS), choices=sorted(ENCODERS))
    parser.add_argument("--tiles", nargs="+", type=int, default=[1000, 10000, 50000, 100000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, help="run only the first K layers (peak as the full model; time scaled)")
    parser.add_argument("--markdown", help="write (or with --append, add) the table to this file")
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("ENCODER", "TILES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.device, args.layers)))
        return
    rows = run(args)
    if args.markdown:
        with open(args.markdown, "a" if args.append else "w") as f:
            f.write(markdown(rows, header=not args.append))


if __name__ == "__main__":
    main()
