"""Golden embeddings of GenBio-PathFM from its official code (run by hand, not by pytest).

    PYTHONPATH=$PWD .venv/bin/python tests/reference/genbio_pathfm_golden.py \
        --official /work/.mirror/genbio-ai+genbio-pathfm/repo

``--official``: a git mirror of github.com/genbio-ai/genbio-pathfm; its ``genbio_pathfm/model.py``
is imported as is (torch + torchvision only). ``GenBio_PathFM_Inference(weights_path, device="cpu")``
loads the release layout (``model.pth``, a plain state dict, strictly); only the depth is
reduced, by giving the module's ``VisionTransformer`` ``depth=1`` (full width). The weights are
those pathray writes (``write_random_weights("genbio-pathfm", seed=0, depth=1)``), saved as
``model.pth``. The official ``encoder.transform`` runs on PIL images, the embedding is
``encoder(x)``. Tiles: 2 real H&E tiles at 224 px (fed as is) and 256 px (resized). Writes
``tests/data/genbio_pathfm_golden.npz``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

SEED, DEPTH, N_TILES = 0, 1, 2


def child(work: Path) -> None:
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    sys.path.insert(0, str(work / "official" / "genbio_pathfm"))
    import model as official

    full_vit = official.VisionTransformer
    official.VisionTransformer = lambda **kwargs: full_vit(**{**kwargs, "depth": DEPTH})  # the class hard-codes 40
    encoder = official.GenBio_PathFM_Inference(str(work / "model.pth"), device="cpu")
    assert len(encoder.model.blocks) == DEPTH
    tiles = np.load(work / "tiles.npy")
    for px in (224, 256):
        img_tensor = torch.stack([encoder.transform(Image.fromarray(np.ascontiguousarray(t[:px, :px]))) for t in tiles])
        with torch.no_grad():
            np.save(work / f"emb_{px}.npy", encoder(img_tensor).numpy())


def parent(official: str) -> None:
    import torch
    from golden_common import extract_from_mirror, he_tiles, run_child, save_golden, tensors_sha256
    from safetensors.torch import load_file

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wdir = write_random_weights("genbio-pathfm", work / "weights", seed=SEED, depth=DEPTH)
        torch.save(load_file(str(wdir / "model.safetensors")), work / "model.pth")  # release layout
        tiles, origins = he_tiles(N_TILES)
        np.save(work / "tiles.npy", tiles)
        commit = extract_from_mirror(official, ["genbio_pathfm/model.py"], work / "official")
        run_child(__file__, work, [])
        out = save_golden(
            "genbio_pathfm",
            **{f"genbio-pathfm_emb_{px}": np.load(work / f"emb_{px}.npy") for px in (224, 256)},
            seed=SEED,
            depth=DEPTH,
            weights_sha256=tensors_sha256(wdir / "model.safetensors"),
            tile_origins_level0=np.array(origins),
            tile_source=f"CMU-1-Small-Region.svs level 0, tests/fixtures/weights.py HE_TILE_ORIGINS[:{N_TILES}]",
            official=f"github.com/genbio-ai/genbio-pathfm@{commit} genbio_pathfm/model.py",
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official")
    ap.add_argument("--child", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        parent(args.official)
