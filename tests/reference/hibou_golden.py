"""Golden embeddings of Hibou-B / Hibou-L from HistAI's official code (not collected by pytest).

The hub model (``AutoModel.from_pretrained("histai/hibou-b", trust_remote_code=True)``) is a custom
``Dinov2ModelWithRegisters`` whose code is not run here; its official counterpart is the HistAI/hibou
repository (``hibou/models/vision_transformer.py``, ``build_model``), whose example notebook shows
both give the same features (``pooler_output`` = ``head(x_norm_clstoken)``). This script:

1. writes pathray's random weights (``write_random_weights(model, dir, seed=SEED,
   num_hidden_layers=DEPTH)``: the hub's ``model.safetensors`` layout);
2. renames them to the official DINOv2 layout (``query``/``key``/``value`` concatenated into
   ``qkv``; ``weights_in``/``weights_out`` are ``w12``/``w3``) and loads them *strictly* into the
   official ``DinoVisionTransformer`` built with ``build_model``'s arguments (vit_base / vit_large,
   patch 14, 4 registers, SwiGLU ``swiglufused``, LayerScale, img_size 224);
3. runs the notebook's transform (``Resize((224, 224), BICUBIC) -> CenterCrop -> ToTensor ->
   Normalize``) on PIL images of the real H&E tiles and ``model(x)``, in fp32 on CPU;
4. saves ``tests/data/<model>_golden.npz`` (embeddings per tile size, :func:`tensors_sha256` of the
   weights, depth, seed, tile source).

Usage (repository root): ``PYTHONPATH=$PWD .venv/bin/python tests/reference/hibou_golden.py
/work/.mirror/HistAI+hibou/repo`` (the official repository, a bare git mirror or a checkout).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
#: model -> (official constructor, depth of the random weights, number of H&E tiles)
CASES = {"hibou-b": ("vit_base", 2, 3), "hibou-l": ("vit_large", 1, 3)}
SEED = 0
TILE_PX = (224, 256)


def official_package(repo: Path, work: Path) -> Path:
    """The ``hibou`` package of the official repository, as files under ``work``."""
    if (repo / "hibou").is_dir():
        return repo
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "HEAD", "hibou"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    return work


def import_official(src: Path):
    """``hibou.models.vision_transformer`` without ``hibou/__init__`` (which imports CellViT's cv2/skimage)."""
    sys.path.insert(0, str(src))
    pkg = types.ModuleType("hibou")
    pkg.__path__ = [str(src / "hibou")]
    sys.modules["hibou"] = pkg
    from hibou.models import vision_transformer

    return vision_transformer


def official_model(vt, arch: str, depth: int) -> torch.nn.Module:
    """``build_model``'s DinoVisionTransformer (its default kwargs), at ``depth`` blocks."""
    width, heads = {"vit_base": (768, 12), "vit_large": (1024, 16)}[arch]
    from hibou.models.layers import MemEffAttention, NestedTensorBlock

    return vt.DinoVisionTransformer(
        img_size=224,
        patch_size=14,
        init_values=1e-5,
        ffn_layer="swiglufused",
        block_chunks=0,
        qkv_bias=True,
        proj_bias=True,
        ffn_bias=True,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        num_register_tokens=4,
        interpolate_offset=0,
        interpolate_antialias=True,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention),
    ).eval()


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub (transformers Dinov2-with-registers) layout in the official DINOv2 names."""
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "register_tokens": sd.pop("embeddings.register_tokens"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "mask_token": sd.pop("embeddings.mask_token"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    depth = 1 + max(int(k.split(".")[2]) for k in sd)
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[dst + "attn.qkv." + p] = torch.cat(
                [sd.pop(f"{src}attention.attention.{n}.{p}") for n in ("query", "key", "value")]
            )
            for a, b in (
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("attention.output.dense", "attn.proj"),
                ("mlp.weights_in", "mlp.w12"),
                ("mlp.weights_out", "mlp.w3"),
            ):
                out[f"{dst}{b}.{p}"] = sd.pop(f"{src}{a}.{p}")
        out[dst + "ls1.gamma"] = sd.pop(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = sd.pop(src + "layer_scale2.lambda1")
    assert not sd, f"checkpoint keys not mapped: {sorted(sd)}"
    return out


def tensors_sha256(path: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes in name order): the file's
    own bytes are not reproducible, safetensors writes its metadata in hash-map order."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def he_tiles(n: int) -> np.ndarray:
    import openslide

    from pathray.demo.cmu import fetch_cmu_small_region
    from tests.fixtures.weights import HE_TILE_ORIGINS

    with openslide.OpenSlide(str(fetch_cmu_small_region())) as slide:
        return np.stack([np.asarray(slide.read_region(o, 0, (256, 256)).convert("RGB")) for o in HE_TILE_ORIGINS[:n]])


def golden(model: str, vt, work: Path) -> dict[str, np.ndarray]:
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms

    from pathray.encoders import write_random_weights

    arch, depth, n = CASES[model]
    wdir = write_random_weights(model, work / model, seed=SEED, num_hidden_layers=depth)
    wfile = wdir / "model.safetensors"
    net = official_model(vt, arch, depth)
    net.load_state_dict(to_official(load_file(str(wfile))), strict=True)
    tf = transforms.Compose(
        [  # HistAI/hibou example.ipynb
            transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.7068, 0.5755, 0.7220], std=[0.1950, 0.2316, 0.1816]),
        ]
    )
    tiles = he_tiles(n)
    out = {
        "weights_sha256": np.array(tensors_sha256(wfile)),
        "depth": np.array(depth),
        "seed": np.array(SEED),
        "tile_source": np.array(
            "CMU-1-Small-Region level 0, tests/fixtures/weights.py HE_TILE_ORIGINS[:n], top-left crop of tile_px"
        ),
    }
    with torch.inference_mode():
        for px in TILE_PX:
            batch = torch.stack([tf(Image.fromarray(np.ascontiguousarray(t[:px, :px]))) for t in tiles])
            out[f"embeddings_{px}"] = net(batch).float().numpy()
    return out


def main(repo: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        vt = import_official(official_package(Path(repo), Path(tmp)))
        for model in CASES:
            path = ROOT / "tests" / "data" / f"{model}_golden.npz"
            np.savez_compressed(path, **golden(model, vt, Path(tmp)))
            print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
