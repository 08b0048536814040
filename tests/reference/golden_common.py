"""Helpers of the golden scripts in this folder (never imported by pytest).

A golden script runs a model's *official* code, fetched from its public repository, on real
H&E tiles with the random weights pathray's ``write_random_weights`` writes, and saves the
embeddings to ``tests/data/<model>_golden.npz``. It runs in two processes: this parent, which
imports pathray (weights, tiles), and a child with a ``PYTHONPATH`` of the official code and
its pinned dependencies only, so that neither can shadow the other (e.g. timm 0.5.4 vs timm 1.x).

Run them with ``ATEN_CPU_CAPABILITY=avx2`` (as tests/conftest.py runs the tests): the random
weights come from ``torch.randn``, whose bits depend on the CPU kernels ATen picks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
#: tiles used by every golden: the first N of tests/fixtures/weights.py HE_TILE_ORIGINS
N_TILES = 4


def he_tiles(n: int = N_TILES, px: int = 256) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``(n, px, px, 3)`` uint8 real H&E tiles of CMU-1-Small-Region (the ``he_tiles`` fixture's)."""
    import openslide

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.weights import HE_TILE_ORIGINS

    from pathray.demo.cmu import fetch_cmu_small_region

    origins = HE_TILE_ORIGINS[:n]
    with openslide.OpenSlide(str(fetch_cmu_small_region())) as slide:
        tiles = [np.asarray(slide.read_region(xy, 0, (px, px)).convert("RGB")) for xy in origins]
    return np.stack(tiles).astype(np.uint8), origins


def extract_from_mirror(git_dir: str, paths: list[str], out: Path) -> str:
    """Check ``paths`` (files or folders) of the bare mirror ``git_dir``'s HEAD out to ``out``; return the commit."""
    commit = subprocess.check_output(["git", "-C", git_dir, "rev-parse", "HEAD"], text=True).strip()
    archive = subprocess.check_output(["git", "-C", git_dir, "archive", "--format=tar", "HEAD", *paths])
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return commit


def run_child(script: str, workdir: Path, pythonpath: list[str]) -> None:
    """Run ``script --child workdir`` with only ``pythonpath`` (plus the venv's site-packages) importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-W", "ignore", script, "--child", str(workdir)],
        env=env,
        check=True,
        cwd=tempfile.gettempdir(),
    )


def tensors_sha256(weights_file: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes, in name order).

    Not the file's own sha256: safetensors writes its ``__metadata__`` map in hash order, so two
    writes of the same weights may differ in their header bytes."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(weights_file)).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_golden(model: str, **arrays) -> Path:
    path = DATA / f"{model}_golden.npz"
    np.savez_compressed(path, **arrays)
    return path
