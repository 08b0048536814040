"""Golden embeddings of CONCH v1 from its official code (github:mahmoodlab/CONCH).

Run by hand (never collected by pytest), from the repository root::

    PYTHONPATH=$PWD .venv/bin/python tests/reference/conch_v1_golden.py /work/.mirror/mahmoodlab+CONCH/repo

The argument is a bare git mirror of mahmoodlab/CONCH; its ``conch`` package is exported to a
temporary directory and imported from there. The script writes pathray's random weights of
``conch-v1`` (``write_random_weights(..., seed=SEED, depth=DEPTH)``, release layout), saves
them as the ``pytorch_model.bin`` the README loads, builds the official model with
``create_model_from_pretrained`` (config ``conch_ViT-B-16.json`` with ``vision_cfg.layers =
DEPTH``), checks that the checkpoint fits it with only parts outside the tile embedding missing
(text tower, projection, caption pooler), runs the official transform and
``encode_image(x, proj_contrast=False, normalize=False)`` (the README's embedding) on real H&E
tiles of CMU-1-Small-Region (448 px: no resampling; 512 px: bicubic resize to 448) and writes
``tests/data/conch_v1_golden.npz``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SEED = 0
DEPTH = 2
#: level-0 origins of tissue-rich regions of CMU-1-Small-Region (0.499 µm/px) and the tile sides read
TILE_ORIGINS = ((1024, 768), (896, 1536))
TILE_SIDES = (448, 512)
OUT = Path(__file__).resolve().parents[1] / "data" / "conch_v1_golden.npz"
#: parts of the official CoCa model that the vision embedding does not use / the release lacks
NOT_VISION = (
    "text.",
    "text_decoder.",
    "logit_scale",
    "visual.proj_contrast",
    "visual.attn_pool_caption.",
    "visual.ln_caption.",
)


def weights_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes in name order): the file's own hash
    varies, safetensors writes its metadata in an arbitrary order."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_mirror(mirror: Path, path: str, dest: Path) -> str:
    """``git archive`` ``path`` of the mirror's HEAD into ``dest``; returns the commit."""
    commit = subprocess.run(
        ["git", "--git-dir", str(mirror), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "--git-dir", str(mirror), "archive", "HEAD", path], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def read_tiles() -> tuple[list, np.ndarray]:
    """PIL tiles (every origin at every side) and their (origin x, origin y, side) rows."""
    import openslide

    from pathray.demo.cmu import fetch_cmu_small_region

    images, rows = [], []
    with openslide.OpenSlide(str(fetch_cmu_small_region())) as slide:
        for side in TILE_SIDES:
            for x, y in TILE_ORIGINS:
                images.append(slide.read_region((x, y), 0, (side, side)).convert("RGB"))
                rows.append((x, y, side))
    return images, np.array(rows, dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mirror", type=Path, help="bare git mirror of mahmoodlab/CONCH")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commit = export_mirror(args.mirror, "conch", tmp)
        sys.path.insert(0, str(tmp))
        from conch.open_clip_custom import create_model_from_pretrained

        wdir = write_random_weights("conch-v1", tmp / "weights", seed=SEED, depth=DEPTH)
        sd = load_file(str(wdir / "model.safetensors"))
        sha = weights_digest(sd)
        torch.save(sd, tmp / "pytorch_model.bin")

        cfg = json.loads((tmp / "conch/open_clip_custom/model_configs/conch_ViT-B-16.json").read_text())
        cfg["vision_cfg"]["layers"] = DEPTH
        model, preprocess = create_model_from_pretrained(cfg, checkpoint_path=str(tmp / "pytorch_model.bin"))
        # the official loader is strict=False: prove the fit (nothing unexpected, only non-vision parts missing)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        assert all(k.startswith(NOT_VISION) for k in missing), [k for k in missing if not k.startswith(NOT_VISION)]
        model.eval()

        images, rows = read_tiles()
        batch = torch.stack([preprocess(im) for im in images])
        with torch.inference_mode():
            emb = model.encode_image(batch, proj_contrast=False, normalize=False)
    np.savez_compressed(
        OUT,
        conch_v1=emb.numpy(),
        tiles=rows,
        weights_sha256=sha,
        seed=SEED,
        depth=DEPTH,
        official=f"github:mahmoodlab/CONCH@{commit}",
        tile_source="CMU-1-Small-Region.svs level 0 read_region((x, y), 0, (side, side)), RGB",
        tile_pixels_sha256=hashlib.sha256(b"".join(np.asarray(im).tobytes() for im in images)).hexdigest(),
    )
    print(f"wrote {OUT}: {tuple(emb.shape)}, weights sha256 {sha[:12]}, CONCH@{commit[:12]}")


if __name__ == "__main__":
    main()
