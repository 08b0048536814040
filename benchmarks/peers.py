"""pathray end to end vs the model alone, on the same slides and model, in one run.

    .venv/bin/python benchmarks/peers.py [--out docs/bench/peers.md] [--quick] [--before-src DIR]

For each slide (the real CMU-1-Small-Region at 0.5 µm/px, and a large synthetic SVS at
0.25 µm/px), with kaiko ViT-S/16 (random weights, full depth, fp32, batch 32):

* **model alone**: the same :class:`pathray.encoders.Encoder` on the same number of tiles,
  in this process, with every core (torch's default threads): the ceiling. Measured before
  and after the slide's pathray runs; the mean is the reference;
* **pathray end to end**: ``pathray embed`` as a user runs it (fresh process, default
  resources, no ``RAY_ADDRESS``), timed from command to exit, and its steady rate (tiles /
  the encoder's working window, from the run report); once as installed (``auto``: the
  in-process runner on a machine without GPU), once with ``--runner ray`` (a local Ray
  cluster), and with ``--before-src`` once more from an older source tree (e.g. a
  ``git worktree`` of an earlier commit) for before/after figures from the same run;
* **first commit**: seconds from the command to the first commit record of a 1-slide manifest.

Ratios (end to end / model alone) come from one run on one machine: the machine's noise
cancels out of them; the absolute tiles/s do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def model_alone(weights: Path, n_tiles: int) -> float:
    """Tiles/s of the encoder alone on ``n_tiles`` random 224-px tiles (one warm-up batch)."""
    from pathray.encoders import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig("kaiko-vits16", weights=str(weights), device="cpu", batch_size=BATCH))
    tiles = np.random.default_rng(0).integers(0, 256, size=(n_tiles, 224, 224, 3), dtype=np.uint8)
    encoder(tiles[:BATCH])
    start = time.perf_counter()
    encoder(tiles)
    return n_tiles / (time.perf_counter() - start)


def pathray_run(slide: Path, weights: Path, out: Path, variant: Variant) -> dict:
    """Run ``pathray embed`` on one slide; wall seconds, first-commit seconds, the report."""
    manifest = out.with_suffix(".csv")
    manifest.write_text(f"slide_id,path\nslide,{slide}\n")
    cmd = [
        sys.executable,
        "-m",
        "pathray.cli",
        "embed",
        "--manifest",
        str(manifest),
        "--models",
        "kaiko-vits16",
        "--weights",
        f"kaiko-vits16={weights}",
        "--batch-size",
        str(BATCH),
        "--out",
        str(out),
        "--no-progress",
        *variant.args,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if variant.src:
        env["PYTHONPATH"] = variant.src
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=variant.src or ROOT
    )  # `python -m` puts the working directory first on sys.path
    first_commit = None
    commits = out / "_commits" / "model=kaiko-vits16"
    while proc.poll() is None:
        if first_commit is None and commits.is_dir() and any(commits.iterdir()):
            first_commit = time.perf_counter() - start
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout.read())
    report = json.loads(next((out / "_runs").glob("*/report.json")).read_text())
    return {
        "wall_s": wall,
        "first_commit_s": first_commit or wall,
        "tiles": report["tiles_read"],
        "steady": report["steady_tiles_per_s"],
        "runner": report.get("runner", "ray"),
    }


NOTES = """*End to end*: `pathray embed` timed from the command to its exit, in a fresh process (imports, start-up,
model load and commit included). *Steady*: the run report's tiles / the encoder's working window. *as installed
(auto)*: what a user gets on this machine (no Ray cluster, no GPU: the in-process runner, `pathray.job.localrun`);
*--runner ray*: the Ray Data plan on a local Ray started by the command; *before*: an older source tree
(`--before-src`, named with its commit), run by the same command on the same slide in the same run."""


@dataclass(frozen=True)
class Variant:
    """One way of running ``pathray embed``: extra options, and an older source tree to run
    instead of this one (``PYTHONPATH``), for before/after figures in the same run."""

    name: str
    args: tuple[str, ...] = ()
    src: str | None = None


def slides(work: Path, quick: bool) -> dict[str, Path]:
    from pathray.demo.cmu import fetch_cmu_small_region
    from pathray.demo.synthetic import write_synthetic_svs

    size = (8000, 6000) if quick else (20000, 15000)
    large = write_synthetic_svs(
        work / "large.svs",
        *size,
        mpp=0.25,
        tissue_rects=((1000, 1000, size[0] // 2, size[1] // 2),),
        downsamples=(1, 4, 16, 32),
    )
    return {
        "CMU-1-Small-Region (0.499 µm/px)": fetch_cmu_small_region(),
        f"synthetic {size[0]}x{size[1]} (0.25 µm/px)": large,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "peers.md"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--before-src", help="an older pathray source tree to run as the 'before' variant")
    parser.add_argument("--before-label", default="before", help="how the table names that variant")
    args = parser.parse_args()
    from pathray.encoders import write_random_weights

    variants = [Variant("as installed (auto)"), Variant("--runner ray", ("--runner", "ray"))]
    if args.before_src:
        variants.append(Variant(args.before_label, src=str(Path(args.before_src).resolve())))
    work = Path(tempfile.mkdtemp(prefix="pathray-peers-"))
    weights = write_random_weights("kaiko-vits16", work / "weights")
    rows = []
    for name, slide in slides(work, args.quick).items():
        runs = {}
        first_alone = model_alone(weights, 256)
        for variant in variants:
            runs[variant.name] = pathray_run(slide, weights, work / f"store-{len(rows)}-{len(runs)}", variant)
        alone = (first_alone + model_alone(weights, 256)) / 2
        for label, run in runs.items():
            e2e = run["tiles"] / run["wall_s"]
            rows.append(
                f"| {name} | {label} ({run['runner']}) | {run['tiles']} | {alone:.1f} | {e2e:.1f} "
                f"| **{e2e / alone:.2f}** | {run['steady']:.1f} | **{run['steady'] / alone:.2f}** "
                f"| {run['first_commit_s']:.1f} | {run['wall_s']:.1f} |"
            )
            print(rows[-1], flush=True)
    header = [
        "# pathray end to end vs the model alone (CPU-only, `benchmarks/peers.py`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU; kaiko ViT-S/16 random weights, full depth, "
        f"fp32, batch {BATCH}; `pathray embed` with default resources, one slide per manifest; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Ratios are from one run; model alone = mean of one "
        "measurement before and one after the slide's runs.",
        "",
        NOTES,
        "",
        "| slide | pathray (runner) | tiles | model alone tiles/s | end to end tiles/s | end to end / alone "
        "| steady tiles/s | steady / alone | command → first commit (s) | command → exit (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    Path(args.out).write_text("\n".join(header + rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
