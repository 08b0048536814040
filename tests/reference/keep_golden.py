"""Golden embeddings of KEEP from its official code (run by hand, not by pytest).

    PYTHONPATH=$PWD .venv/bin/python tests/reference/keep_golden.py \
        --official /work/.mirror/MAGIC-AI4Med+KEEP/repo

``--official``: a git mirror of github.com/MAGIC-AI4Med/KEEP. Its ``quick_start/keep_inference.py``
defines ``KEEPConfig``/``KEEPModel`` (the model the hub's remote code builds); the definitions
(everything before the script's own checkpoint paths) are executed as they are, with the
venv's timm and transformers. Only the depth is reduced: ``timm.create_model`` is given
``depth=2`` (full width), and the text tower is a 1-layer BERT (it is not part of the image
embedding: the check is that only ``text.*`` and ``logit_scale`` are missing when the weights
pathray writes, ``write_random_weights("keep", seed=0, depth=2)``, are loaded). The README's
transform runs on PIL images, the embedding is ``model.encode_image(x)``. Tiles: 4 real H&E tiles
at 224 px (fed as is) and 256 px (resized). Writes ``tests/data/keep_golden.npz``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import numpy as np

SEED, DEPTH = 0, 2
TINY_BERT = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vocab_size=128)


def child(work: Path) -> None:
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms

    torch.set_num_threads(1)
    source = (work / "official" / "quick_start" / "keep_inference.py").read_text()
    definitions = source[: source.index("model_path = ")]
    timm.create_model = functools.partial(timm.create_model, depth=DEPTH)  # reduced depth, full width
    scope: dict = {"__name__": "keep_inference"}
    exec(compile(definitions, "keep_inference.py", "exec"), scope)
    model = scope["KEEPModel"](scope["KEEPConfig"](text_config=TINY_BERT, projection_dim=768))
    missing, unexpected = model.load_state_dict(load_file(str(work / "weights" / "model.safetensors")), strict=False)
    assert not unexpected, unexpected
    assert missing and all(k.startswith("text.") or k == "logit_scale" for k in missing), missing
    assert len(model.visual.blocks) == DEPTH
    model.eval()
    transform = transforms.Compose(
        [
            transforms.Resize(size=224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size=(224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    tiles = np.load(work / "tiles.npy")
    for px in (224, 256):
        img_input = torch.stack([transform(Image.fromarray(np.ascontiguousarray(t[:px, :px]))) for t in tiles])
        with torch.no_grad():
            np.save(work / f"emb_{px}.npy", model.encode_image(img_input).numpy())


def parent(official: str) -> None:
    from golden_common import extract_from_mirror, he_tiles, run_child, save_golden, tensors_sha256

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wdir = write_random_weights("keep", work / "weights", seed=SEED, depth=DEPTH)
        tiles, origins = he_tiles()
        np.save(work / "tiles.npy", tiles)
        commit = extract_from_mirror(official, ["quick_start/keep_inference.py"], work / "official")
        run_child(__file__, work, [])
        out = save_golden(
            "keep",
            keep_emb_224=np.load(work / "emb_224.npy"),
            keep_emb_256=np.load(work / "emb_256.npy"),
            seed=SEED,
            depth=DEPTH,
            weights_sha256=tensors_sha256(wdir / "model.safetensors"),
            tile_origins_level0=np.array(origins),
            tile_source="CMU-1-Small-Region.svs level 0, tests/fixtures/weights.py HE_TILE_ORIGINS[:4]",
            official=f"github.com/MAGIC-AI4Med/KEEP@{commit} quick_start/keep_inference.py (KEEPModel)",
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
