"""Golden embeddings of CTransPath from its official code (run by hand, not by pytest).

    pip install --no-deps --target /tmp/timm_ctp timm-ctp==0.5.4
    PYTHONPATH=$PWD .venv/bin/python tests/reference/ctranspath_golden.py \
        --official /work/.mirror/Xiyue-Wang+TransPath/repo --timm-ctp /tmp/timm_ctp

``--official``: a git mirror of github.com/Xiyue-Wang/TransPath (its ``ctran.py`` is used as
is). ``--timm-ctp``: a folder holding PyPI's ``timm-ctp==0.5.4``, the modified timm 0.5.4 the
TransPath/CHIEF READMEs require (stock timm 0.5.4 + the ``embed_layer`` argument of
``SwinTransformer``; it is imported as ``timm``, as the README's ``pip install timm-0.5.4.tar``
would). The official recipe (get_features_CTransPath.py): ``ctranspath()``, ``model.head =
nn.Identity()``, ``load_state_dict(torch.load(pth)['model'], strict=True)``,
``Resize(224) -> ToTensor -> Normalize(ImageNet)`` on PIL images. Writes
``tests/data/ctranspath_golden.npz``: embeddings of 4 real H&E tiles at 224 px (fed as is) and
256 px (resized), the sha256 of the weights' tensors and where tiles and code come from.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

MODEL = "ctranspath"
SEED = 0


def child(work: Path) -> None:
    import torch
    import torch.nn as nn
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(1)
    import timm_ctp
    import timm_ctp.models.layers.helpers  # noqa: F401  (registers the submodule aliased below)

    # the modified timm installed as `timm`, as the official README has it
    for name in ("", ".models", ".models.layers", ".models.layers.helpers"):
        sys.modules["timm" + name] = sys.modules["timm_ctp" + name]
    sys.path.insert(0, str(work / "official"))
    from ctran import ctranspath

    model = ctranspath()
    model.head = nn.Identity()
    td = torch.load(work / "ctranspath.pth", weights_only=True)
    model.load_state_dict(td["model"], strict=True)
    model.eval()
    trnsfrms_val = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    tiles = np.load(work / "tiles.npy")
    for px in (224, 256):
        batch = torch.stack([trnsfrms_val(Image.fromarray(np.ascontiguousarray(t[:px, :px]))) for t in tiles])
        with torch.no_grad():
            np.save(work / f"emb_{px}.npy", model(batch).numpy())


def parent(official: str, timm_ctp: str) -> None:
    import torch
    from golden_common import extract_from_mirror, he_tiles, run_child, save_golden, tensors_sha256
    from safetensors.torch import load_file

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wdir = write_random_weights(MODEL, work / "weights", seed=SEED)
        torch.save({"model": load_file(str(wdir / "model.safetensors"))}, work / "ctranspath.pth")  # release layout
        tiles, origins = he_tiles()
        np.save(work / "tiles.npy", tiles)
        commit = extract_from_mirror(official, ["ctran.py"], work / "official")
        run_child(__file__, work, [timm_ctp])
        out = save_golden(
            MODEL,
            ctranspath_emb_224=np.load(work / "emb_224.npy"),
            ctranspath_emb_256=np.load(work / "emb_256.npy"),
            seed=SEED,
            weights_sha256=tensors_sha256(wdir / "model.safetensors"),
            tile_origins_level0=np.array(origins),
            tile_source="CMU-1-Small-Region.svs level 0, tests/fixtures/weights.py HE_TILE_ORIGINS[:4]",
            official=f"github.com/Xiyue-Wang/TransPath@{commit} ctran.py + timm-ctp 0.5.4",
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official")
    ap.add_argument("--timm-ctp")
    ap.add_argument("--child", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        parent(args.official, args.timm_ctp)
