"""Golden embeddings of CLAM's ``resnet50_trunc`` from its official code (github:mahmoodlab/CLAM).

Run by hand (never collected by pytest), from the repository root::

    PYTHONPATH=$PWD .venv/bin/python tests/reference/resnet50_trunc_golden.py /work/.mirror/mahmoodlab+CLAM/repo

The argument is a bare git mirror of mahmoodlab/CLAM; its ``models`` and ``utils`` packages are
exported to a temporary directory and imported from there. The release is a full ImageNet
ResNet-50 (``resnet50.tv_in1k``): pathray's random weights of ``resnet50-trunc``
(``write_random_weights("resnet50-trunc", seed=SEED)``: stem and layer1-3) are completed with a
random ``layer4`` and ``fc`` (timm ``resnet50``, ``torch.manual_seed(FULL_SEED)``; the official
model drops them) and saved as one full ``resnet50`` checkpoint. The official
``TimmCNNEncoder`` (``features_only=True, out_indices=(3,)``, ``AdaptiveAvgPool2d(1)``) loads it
through timm's ``pretrained_cfg_overlay=dict(file=...)`` instead of the hub download, and the
official ``get_eval_transforms(IMAGENET mean/std, target_img_size=224)`` (``Resize(224)``)
and forward run on real H&E tiles. Writes ``tests/data/resnet50_trunc_golden.npz``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vit_golden_common import export_mirror, read_tiles, save_golden, weights_sha256  # noqa: E402

SEED = 0
FULL_SEED = 1


def full_release(trunc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full ResNet-50 state dict: ``trunc``'s stem and layer1-3, a random layer4 and fc."""
    import timm

    torch.manual_seed(FULL_SEED)
    full = timm.create_model("resnet50", pretrained=False).state_dict()
    missing = [k for k in full if not k.startswith(("layer4.", "fc.")) and k not in trunc]
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    return {k: trunc.get(k, v) for k, v in full.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mirror", type=Path, help="bare git mirror of mahmoodlab/CLAM")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    from pathray.encoders import write_random_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        commit = export_mirror(args.mirror, ["models", "utils"], tmp / "CLAM")
        sys.path.insert(0, str(tmp / "CLAM"))
        from models.timm_wrapper import TimmCNNEncoder
        from utils.constants import MODEL2CONSTANTS
        from utils.transform_utils import get_eval_transforms

        wdir = write_random_weights("resnet50-trunc", tmp / "weights", seed=SEED)
        trunc = load_file(str(wdir / "model.safetensors"))
        save_file(full_release(trunc), str(tmp / "resnet50_full.safetensors"))
        kwargs = {
            "features_only": True,
            "out_indices": (3,),
            "pretrained": True,
            "num_classes": 0,
            "pretrained_cfg_overlay": {"file": str(tmp / "resnet50_full.safetensors")},
        }
        model = TimmCNNEncoder(kwargs=kwargs).eval()
        constants = MODEL2CONSTANTS["resnet50_trunc"]
        transform = get_eval_transforms(mean=constants["mean"], std=constants["std"], target_img_size=224)
        images, rows = read_tiles()
        with torch.inference_mode():
            emb = model(torch.stack([transform(im) for im in images]))
    out = save_golden(
        "resnet50_trunc",
        images,
        rows,
        resnet50_trunc=emb.numpy(),
        weights_sha256=weights_sha256(trunc),
        seed=SEED,
        full_seed=FULL_SEED,
        official=f"github:mahmoodlab/CLAM@{commit}",
    )
    print(f"wrote {out}: {tuple(emb.shape)}, CLAM@{commit[:12]}")


if __name__ == "__main__":
    main()
