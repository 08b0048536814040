"""Encoder throughput: tiles/s per model, batch size, dtype, with/without torch.compile.

Random weights of the exact architecture (optionally shrunk with ``name@depth``) are written
to a temp dir and loaded through ``load_encoder``, so the timed path is the production one:
uint8 numpy tiles -> (pinned host buffer, non-blocking copy on CUDA) -> torch preprocessing
-> model under ``inference_mode`` / autocast -> numpy embeddings.

FLOPs per tile are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the model
forward (matmuls/convs/attention; preprocessing is not counted). On CUDA, MFU is the achieved
FLOP/s over the device's dense peak for the dtype; on CPU only tiles/s and achieved GFLOP/s
are reported (no meaningful peak).

    python benchmarks/encoders.py --models kaiko-vits16 uni2-h@2 --batch-sizes 16 64 \\
        --dtypes fp32 bf16 --compile off on --markdown docs/bench/encoders.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathray.encoders import (  # noqa: E402
    EncoderConfig,
    cost,  # noqa: E402
    get_spec,
    list_models,
    load_encoder,
    write_random_weights,
)
from pathray.encoders.builders import depth_override  # noqa: E402

#: dense peak TFLOP/s by (device-name substring, dtype); fp32 = TF32 tensor cores when enabled
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.4,
    ("H100", "fp16"): 989.4,
    ("H100", "fp32"): 494.7,
    ("H200", "bf16"): 989.4,
    ("H200", "fp16"): 989.4,
    ("H200", "fp32"): 494.7,
    ("A100", "bf16"): 312.0,
    ("A100", "fp16"): 312.0,
    ("A100", "fp32"): 156.0,
}


def device_peak(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (key, dt), peak in PEAK_TFLOPS.items():
        if key in name and dt == dtype:
            return peak * 1e12
    return None


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, torch threads={torch.get_num_threads()}, os cores={os.cpu_count()}"


def flops_per_tile(encoder) -> float:
    """Model FLOPs per tile of the loaded variant (see :func:`pathray.encoders.cost.flops_per_tile`)."""
    return cost.flops_per_tile(encoder.spec, encoder.architecture, encoder.model_kwargs)


def bench_one(encoder, batch_size: int, tile_px: int, min_seconds: float, warmup: int) -> tuple[float, int]:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(batch_size, tile_px, tile_px, 3), dtype=np.uint8)
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        encoder(tiles)
    sync()
    n_iter, t0 = 0, time.perf_counter()
    while True:
        encoder(tiles)
        n_iter += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and n_iter >= 2:
            break
    return batch_size * n_iter / elapsed, n_iter


def parse_model(arg: str) -> tuple[str, int | None]:
    name, _, depth = arg.partition("@")
    return name, (int(depth) if depth else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["kaiko-vits16", "kaiko-vitb16", "uni@4", "uni2-h@2"],
        help="model names, or 'all' for every registered model; name@N shrinks to N blocks (same width)",
    )
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--tile-px",
        type=int,
        default=None,
        help="tile side fed to every model (default: each model's "
        "native tile, which its own preprocessing resizes to its input)",
    )
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", type=Path, default=None, help="write rows as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help="write a markdown table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    rows = []
    models = list_models() if args.models == ["all"] else args.models
    with tempfile.TemporaryDirectory() as tmp:
        for model_arg in models:
            name, depth = parse_model(model_arg)
            spec = get_spec(name)
            overrides = depth_override(spec.builder, depth) if depth else {}
            tile_px = args.tile_px or spec.tile_px
            wdir = write_random_weights(name, Path(tmp) / model_arg.replace(":", "_").replace("@", "_d"), **overrides)
            for compile_flag in args.compile:
                for dtype in args.dtypes:
                    for bs in args.batch_sizes:
                        cfg = EncoderConfig(
                            name,
                            weights=str(wdir),
                            device=args.device,
                            dtype=dtype,
                            compile=compile_flag == "on",
                            batch_size=bs,
                        )
                        enc = load_encoder(cfg)
                        fpt = flops_per_tile(enc)
                        try:
                            tps, n_iter = bench_one(enc, bs, tile_px, args.min_seconds, args.warmup)
                        except Exception as exc:  # noqa: BLE001 - e.g. no compiler for inductor
                            print(f"{model_arg} {dtype} bs={bs} compile={compile_flag}: FAILED {exc}", file=sys.stderr)
                            continue
                        achieved = tps * fpt
                        peak = device_peak(enc.device, dtype)
                        label = name if not depth else f"{name} (depth {depth})"
                        row = dict(
                            model=label,
                            tile_px=tile_px,
                            params_m=round(enc.num_params / 1e6, 1),
                            dtype=dtype,
                            compile=compile_flag,
                            batch=bs,
                            tiles_per_s=round(tps, 2),
                            gflop_per_tile=round(fpt / 1e9, 2),
                            achieved_gflops=round(achieved / 1e9, 1),
                            mfu=(round(achieved / peak, 3) if peak else None),
                            iters=n_iter,
                        )
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        del enc
    dev = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    header = {
        "device": device_label(dev),
        "torch": torch.__version__,
        "tile_px": args.tile_px or "native",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    table = [
        "| model | tile px | params (M) | dtype | compile | batch | tiles/s | GFLOP/tile | achieved GFLOP/s | MFU |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (CPU)"
        table.append(
            f"| {r['model']} | {r['tile_px']} | {r['params_m']} | {r['dtype']} | {r['compile']} | {r['batch']} | "
            f"{r['tiles_per_s']} | {r['gflop_per_tile']} | {r['achieved_gflops']} | {mfu} |"
        )
    text = "\n".join(table)
    print(f"\n{header}\n{text}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"<!-- generated by benchmarks/encoders.py: {json.dumps(header)} -->\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
