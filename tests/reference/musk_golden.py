"""Golden embeddings of MUSK from its official code (run by hand, not by pytest).

    pip install --no-deps --target /tmp/musk_deps timm==0.9.8 fairscale==0.4.13
    PYTHONPATH=$PWD .venv/bin/python tests/reference/musk_golden.py \
        --official /work/.mirror/lilab-stanford+MUSK/repo --deps /tmp/musk_deps

``--official``: a git mirror of github.com/lilab-stanford/MUSK (its ``musk`` package, with the
vendored torchscale, is used as is). ``--deps``: its pinned timm (requirements.txt: 0.9.8) and
fairscale, which the child process imports instead of the venv's. The official model is
``musk.modeling.MUSK`` built from ``_get_large_config(img_size=384)`` (the config of
``musk_large_patch16_384``) with ``encoder_layers`` reduced to 2 (full widths); it loads the
weights pathray writes (``write_random_weights("musk", seed=0, depth=2)``: the image tower under
``beit3.``) with the official ``utils.load_model_and_may_interpolate``, after checking that only
the parts pathray leaves out (text tower and experts, heads, logit scale, mask token) are missing.
The README's transform runs on PIL images and the README's call gives both embeddings:
``ms_aug=True`` (``musk``) and ``ms_aug=False`` (``musk-cls``), ``with_head=False,
out_norm=False, return_global=True``. Tiles: 2 real H&E tiles at 384 px (fed as is) and at 256 px
(upsampled). Writes ``tests/data/musk_golden.npz``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

SEED, DEPTH, N_TILES, SIZES = 0, 2, 2, (256, 384)


def _missing_ok(key: str) -> bool:
    return (
        ".B." in key
        or key.startswith(("beit3.text_embed.", "language_head.", "vision_head."))
        or key in ("logit_scale", "beit3.vision_embed.mask_token")
    )


def child(work: Path) -> None:
    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data.constants import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

    torch.set_num_threads(1)
    sys.path.insert(0, str(work / "official"))
    from musk import modeling, utils

    args = modeling._get_large_config(img_size=384)  # = musk_large_patch16_384's config
    args.encoder_layers = DEPTH
    model = modeling.MUSK(args)
    missing, unexpected = model.load_state_dict(load_file(str(work / "weights" / "model.safetensors")), strict=False)
    assert not unexpected, unexpected
    assert missing and all(_missing_ok(k) for k in missing), [k for k in missing if not _missing_ok(k)]
    utils.load_model_and_may_interpolate(str(work / "weights" / "model.safetensors"), model, "model|module", "")
    model.eval()
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(384, interpolation=3, antialias=True),
            torchvision.transforms.CenterCrop((384, 384)),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
        ]
    )
    for px in SIZES:
        tiles = np.load(work / f"tiles_{px}.npy")
        img_tensor = torch.stack([transform(Image.fromarray(t)) for t in tiles])
        for name, ms_aug in (("musk", True), ("musk-cls", False)):
            with torch.inference_mode():
                emb = model(image=img_tensor, with_head=False, out_norm=False, ms_aug=ms_aug, return_global=True)[0]
            np.save(work / f"{name}_emb_{px}.npy", emb.numpy())


def parent(official: str, deps: str) -> None:
    from golden_common import extract_from_mirror, he_tiles, run_child, save_golden, tensors_sha256

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wdir = write_random_weights("musk", work / "weights", seed=SEED, depth=DEPTH)
        for px in SIZES:
            tiles, origins = he_tiles(N_TILES, px)
            np.save(work / f"tiles_{px}.npy", tiles)
        commit = extract_from_mirror(official, ["musk"], work / "official")
        run_child(__file__, work, [deps])
        embs = {f"{m}_emb_{px}": np.load(work / f"{m}_emb_{px}.npy") for m in ("musk", "musk-cls") for px in SIZES}
        out = save_golden(
            "musk",
            **embs,
            seed=SEED,
            depth=DEPTH,
            weights_sha256=tensors_sha256(wdir / "model.safetensors"),
            tile_origins_level0=np.array(origins),
            tile_source=f"CMU-1-Small-Region.svs level 0, tests/fixtures/weights.py HE_TILE_ORIGINS[:{N_TILES}]",
            official=f"github.com/lilab-stanford/MUSK@{commit} musk/ + timm 0.9.8 + fairscale 0.4.13",
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official")
    ap.add_argument("--deps")
    ap.add_argument("--child", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        parent(args.official, args.deps)
