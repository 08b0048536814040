"""Golden embeddings of CONCH v1.5 from TITAN's official code (``conch_v1_5.py``, mirrored in
github:clemsgrs/unicorn_baseline ``src/unicorn_baseline/vision/pathology/titan/``).

Run by hand (never collected by pytest), from the repository root::

    PYTHONPATH=$PWD:/path/to/einops_exts .venv/bin/python tests/reference/conch_v15_golden.py \\
        /work/.mirror/clemsgrs+unicorn_baseline/repo

The official module imports ``einops_exts`` (PyPI ``einops-exts``; ``pip install --target DIR
--no-deps einops-exts`` and put DIR on PYTHONPATH). The script writes pathray's random weights of
``conch-v1.5`` (``write_random_weights(..., seed=SEED, depth=DEPTH)``, the layout of
``pytorch_model_vision.bin``: ``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``), checks
that their keys and shapes are exactly the official model's, builds it with the official
``build_conch(conch_config, model_dir)`` (TITAN ``config.json`` ``conch_config`` with ``depth =
DEPTH``), runs its eval transform and forward on real H&E tiles of CMU-1-Small-Region (512 px,
TITAN's tile: bilinear resize to 448; 448 px: no resampling) and writes
``tests/data/conch_v15_golden.npz``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conch_v1_golden import export_mirror, read_tiles, weights_digest  # noqa: E402

SEED = 0
DEPTH = 1
TITAN_DIR = "src/unicorn_baseline/vision/pathology/titan"
OUT = Path(__file__).resolve().parents[1] / "data" / "conch_v15_golden.npz"


def official_model(src: Path, weights: dict[str, torch.Tensor], tmp: Path):
    """``build_conch`` of the official module on ``weights`` (saved where it loads them from)."""
    sys.path.insert(0, str(src))
    from unicorn_baseline.vision.pathology.titan.conch_v1_5 import build_conch

    conch_config = json.loads((src / "unicorn_baseline/vision/pathology/titan/config.json").read_text())["conch_config"]
    cfg = SimpleNamespace(**{**conch_config, "depth": DEPTH})
    torch.save(weights, tmp / "conch-tile-encoder.pth")
    model, transform = build_conch(cfg, tmp)
    # build_conch keeps the model's own init for keys it cannot match: require an exact fit
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in weights.items()}, set(expected) ^ set(weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    return model.eval(), transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mirror", type=Path, help="bare git mirror of clemsgrs/unicorn_baseline")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commit = export_mirror(args.mirror, TITAN_DIR, tmp)
        export_mirror(args.mirror, "src/unicorn_baseline/vision/pathology/model_utils.py", tmp)
        for pkg in ("src/unicorn_baseline", "src/unicorn_baseline/vision", "src/unicorn_baseline/vision/pathology"):
            export_mirror(args.mirror, f"{pkg}/__init__.py", tmp)
        wdir = write_random_weights("conch-v1.5", tmp / "weights", seed=SEED, depth=DEPTH)
        sd = load_file(str(wdir / "model.safetensors"))
        model, transform = official_model(tmp / "src", sd, tmp)
        images, rows = read_tiles()
        with torch.inference_mode():
            emb = model(torch.stack([transform(im) for im in images]))
    np.savez_compressed(
        OUT,
        conch_v1_5=emb.numpy(),
        tiles=rows,
        weights_sha256=weights_digest(sd),
        seed=SEED,
        depth=DEPTH,
        official=f"github:clemsgrs/unicorn_baseline@{commit}:{TITAN_DIR}/conch_v1_5.py",
        tile_source="CMU-1-Small-Region.svs level 0 read_region((x, y), 0, (side, side)), RGB",
        tile_pixels_sha256=hashlib.sha256(b"".join(np.asarray(im).tobytes() for im in images)).hexdigest(),
    )
    print(f"wrote {OUT}: {tuple(emb.shape)}, unicorn_baseline@{commit[:12]}")


if __name__ == "__main__":
    main()
