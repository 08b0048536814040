"""Golden embeddings of GPFM from its official code (github:birkhoffkiki/GPFM, ``models/dinov2``).

Run by hand (never collected by pytest), from the repository root::

    PYTHONPATH=$PWD .venv/bin/python tests/reference/gpfm_golden.py /work/.mirror/birkhoffkiki+GPFM/repo

The argument is a bare git mirror of birkhoffkiki/GPFM; its ``models`` package is exported to a
temporary directory and imported from there. pathray's random weights of ``gpfm``
(``write_random_weights("gpfm", seed=SEED, depth=DEPTH)``) are in the hub release's layout
(majiabo/GPFM ``GPFM.pth``: a flat timm ``vit_large_patch14_dinov2`` state dict). The GitHub
code reads the training layout instead (``{"teacher": {"backbone.<key>"}}`` with blocks in
``block_chunks=4`` chunks and a ``mask_token``), so the same tensors are renamed into it (names
only; ``mask_token`` is zeros, inference never reads it). The official ``build_model(...,
'GPFM', ckpt)`` then loads them strictly into its ``vit_large`` (``depth`` reduced to DEPTH: the
official ``vit_large`` is called with that depth, nothing else changed), and the official
``build_transform()`` (``Resize((224, 224), bicubic)``, ImageNet normalisation) and forward
(final-norm CLS token) run on real H&E tiles. Writes ``tests/data/gpfm_golden.npz``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vit_golden_common import export_mirror, read_tiles, save_golden, weights_sha256  # noqa: E402

SEED = 0
DEPTH = 4
BLOCK_CHUNKS = 4  # GPFM's build_model


def to_training_layout(sd: dict[str, torch.Tensor], depth: int) -> dict:
    """The hub's flat timm-layout state dict renamed into the GitHub release's teacher layout."""
    chunk = depth // BLOCK_CHUNKS
    teacher = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{int(index) // chunk}.{index}.{rest}"
        teacher["backbone." + key] = value
    teacher["backbone.mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return {"teacher": teacher}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mirror", type=Path, help="bare git mirror of birkhoffkiki/GPFM")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commit = export_mirror(args.mirror, ["models"], tmp / "GPFM")
        sys.path.insert(0, str(tmp / "GPFM"))
        from models.dinov2 import build_model, build_transform
        from models.dinov2 import vision_transformer as vits
        from models.dinov2.layers import MemEffAttention
        from models.dinov2.layers import NestedTensorBlock as Block

        def vit_large_reduced(patch_size=16, **kwargs):  # official vit_large with depth=DEPTH
            return vits.DinoVisionTransformer(
                patch_size=patch_size,
                embed_dim=1024,
                depth=DEPTH,
                num_heads=16,
                mlp_ratio=4,
                block_fn=partial(Block, attn_class=MemEffAttention),
                **kwargs,
            )

        vits.vit_large = vit_large_reduced
        wdir = write_random_weights("gpfm", tmp / "weights", seed=SEED, depth=DEPTH)
        sd = load_file(str(wdir / "model.safetensors"))
        torch.save(to_training_layout(sd, DEPTH), tmp / "GPFM.pth")
        model, _ = build_model("cpu", 1, "GPFM", str(tmp / "GPFM.pth"))
        transform = build_transform()
        images, rows = read_tiles()
        with torch.inference_mode():
            emb = model(torch.stack([transform(im) for im in images]))
    out = save_golden(
        "gpfm",
        images,
        rows,
        gpfm=emb.numpy(),
        weights_sha256=weights_sha256(sd),
        seed=SEED,
        depth=DEPTH,
        official=f"github:birkhoffkiki/GPFM@{commit}",
    )
    print(f"wrote {out}: {tuple(emb.shape)}, GPFM@{commit[:12]}")


if __name__ == "__main__":
    main()
