"""Golden embeddings of OpenMidnight from the official DINOv2 code (github:facebookresearch/dinov2).

Run by hand (never collected by pytest), from the repository root::

    PYTHONPATH=$PWD .venv/bin/python tests/reference/openmidnight_golden.py /work/.mirror/facebookresearch+dinov2/repo

The argument is a bare git mirror of facebookresearch/dinov2; its ``dinov2`` package is exported
to a temporary directory and imported from there. OpenMidnight's loader (as TRIDENT's
``OpenMidnightInferenceEncoder`` does it): ``torch.hub.load("facebookresearch/dinov2",
"dinov2_vitg14_reg", pretrained=False)``, the checkpoint's ``pos_embed`` replaces the model's,
``load_state_dict(checkpoint, strict=True)``, ``Resize((224, 224))`` + ``ToTensor`` + ImageNet
``Normalize``, ``model(x)``. Here ``dinov2_vitg14_reg`` is the hub entry point itself, with the
official ``vit_giant2`` called at ``depth=DEPTH`` (nothing else changed), and the checkpoint is
pathray's ``write_random_weights("openmidnight", seed=SEED, depth=DEPTH)`` saved as the
release's ``teacher_checkpoint_load.pt`` (a flat state dict with a 224-px, 16x16 ``pos_embed``).

Besides the card's 224-px input, the official model also embeds the 256-px tiles centre-cropped to
252 px, not resized (an 18x18 grid: the official antialiased ``interpolate_pos_encoding``), key
``interp_252``.
Writes ``tests/data/openmidnight_golden.npz``.
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
DEPTH = 1
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mirror", type=Path, help="bare git mirror of facebookresearch/dinov2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from torchvision import transforms

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commit = export_mirror(args.mirror, ["dinov2", "hubconf.py"], tmp / "dinov2")
        sys.path.insert(0, str(tmp / "dinov2"))
        from dinov2.hub.backbones import dinov2_vitg14_reg
        from dinov2.layers import MemEffAttention, NestedTensorBlock
        from dinov2.models import vision_transformer as vits

        def vit_giant2_reduced(patch_size=16, num_register_tokens=0, **kwargs):  # official vit_giant2, depth=DEPTH
            return vits.DinoVisionTransformer(
                patch_size=patch_size,
                embed_dim=1536,
                depth=DEPTH,
                num_heads=24,
                mlp_ratio=4,
                block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
                num_register_tokens=num_register_tokens,
                **kwargs,
            )

        vits.vit_giant2 = vit_giant2_reduced
        wdir = write_random_weights("openmidnight", tmp / "weights", seed=SEED, depth=DEPTH)
        sd = load_file(str(wdir / "model.safetensors"))
        torch.save(sd, tmp / "teacher_checkpoint_load.pt")

        model = dinov2_vitg14_reg(pretrained=False)
        checkpoint = torch.load(tmp / "teacher_checkpoint_load.pt", map_location="cpu", weights_only=False)
        model.pos_embed = torch.nn.parameter.Parameter(checkpoint["pos_embed"])
        model.load_state_dict(checkpoint, strict=True)
        model.eval()
        card = transforms.Compose(
            [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(**IMAGENET)]
        )
        plain = transforms.Compose(
            [transforms.CenterCrop(252), transforms.ToTensor(), transforms.Normalize(**IMAGENET)]
        )
        images, rows = read_tiles()
        with torch.inference_mode():
            emb = model(torch.stack([card(im) for im in images]))
            interp = model(torch.stack([plain(im) for im, row in zip(images, rows) if row[2] == 256]))
    out = save_golden(
        "openmidnight",
        images,
        rows,
        openmidnight=emb.numpy(),
        interp_252=interp.numpy(),
        weights_sha256=weights_sha256(sd),
        seed=SEED,
        depth=DEPTH,
        official=f"github:facebookresearch/dinov2@{commit}",
    )
    print(f"wrote {out}: {tuple(emb.shape)} + {tuple(interp.shape)}, dinov2@{commit[:12]}")


if __name__ == "__main__":
    main()
