"""Frozen official TITAN outputs for tests/test_slide_encoder_titan.py (not collected by pytest).

Runs the official slide encoder — ``modeling_titan.py``, ``vision_transformer.py`` and
``configuration_titan.py`` of ``src/unicorn_baseline/vision/pathology/titan/`` in
github.com/clemsgrs/unicorn_baseline (the MahmoodLab/TITAN hub code with the text tower left
out), imported from the fetched mirror, unmodified — in fp32 on CPU with pathray's random
weights written in the release layout (``model.safetensors``: ``vision_encoder.*`` + text-tower
keys), the ``vision_encoder.`` part loaded with ``strict=True``. One stand-in: the module
``conch_v1_5`` (the CONCH tile encoder builder, never called here; it needs ``einops_exts``) is
an empty module. Inputs: synthetic slides tiled as pathray tiles them (512-px tiles at
0.5 µm/px, ``x = round(i * 256 / mpp)``), with gaps and offsets, at 0.25, 0.2631 and 0.5
µm/px, fed to the official code as TRIDENT writes them: ``coords = (i, j) * patch_size_level0``
with the integer tile side in level-0 px; plus one input with tiles sharing cells (summed by
the official ``index_add_``) and one all-zero tile (dropped as background).

Usage::

    PYTHONPATH=$PWD .venv/bin/python tests/reference/titan_golden.py /work/.mirror/clemsgrs+unicorn_baseline/repo
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from pathray.encoders.checkpoint import file_sha256
from pathray.slide_level.encoders.titan import (
    CHECKPOINT_PREFIX,
    random_titan_net,
    state_digest,
    write_random_weights,
)
from pathray.slide_level.encoders.titan_net import TitanSlideNet

OFFICIAL_DIR = "src/unicorn_baseline/vision/pathology/titan"
OUT = Path(__file__).resolve().parents[1] / "data" / "titan_golden.npz"
WEIGHTS_SEED = 11
#: slide cases: name -> the slide's µm/px (their lattices: make_cases)
CASES = {
    "mpp025": 0.25,
    "mpp02631": 0.2631,
    "mpp05_long": 0.5,
}


def import_official(mirror: Path):
    """The official package, written from the mirror's HEAD into a temp dir and imported."""
    commit = subprocess.run(
        ["git", "-C", str(mirror), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    pkg = Path(tempfile.mkdtemp()) / "titan_official"
    pkg.mkdir()
    for name in ("modeling_titan.py", "vision_transformer.py", "configuration_titan.py", "config.json"):
        text = subprocess.run(
            ["git", "-C", str(mirror), "show", f"HEAD:{OFFICIAL_DIR}/{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (pkg / name).write_text(text)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    stub = types.ModuleType("titan_official.conch_v1_5")
    stub.build_conch = None  # stand-in: the CONCH builder is never called
    sys.modules["titan_official.conch_v1_5"] = stub
    import titan_official.modeling_titan as modeling

    return modeling, commit


def lattice(rng: np.random.Generator, cols: range, rows: range, keep: float) -> np.ndarray:
    """Kept (i, j) tile indices of a tissue-like region: a random mask with gaps, row-major."""
    ii, jj = np.meshgrid(np.array(cols), np.array(rows), indexing="xy")
    mask = rng.random(ii.shape) < keep
    mask[len(rows) // 3, :] = False  # a gap across the slide
    return np.stack([ii[mask], jj[mask]], 1).astype(np.int64)


def make_cases(rng: np.random.Generator) -> dict[str, dict]:
    cases = {}
    shapes = {
        "mpp025": (range(37, 61), range(12, 30), 0.7),
        "mpp02631": (range(5, 35), range(40, 62), 0.6),
        "mpp05_long": (range(3, 703), range(100, 102), 0.9),
    }
    for tag, mpp in CASES.items():
        cols, rows, keep = shapes[tag]
        ij = lattice(rng, cols, rows, keep)
        step = 512 * 0.5 / mpp
        cases[tag] = {
            "ij": ij,
            "mpp": mpp,
            "x": np.round(ij[:, 0] * step).astype(np.int64),
            "y": np.round(ij[:, 1] * step).astype(np.int64),
            "patch_size_lv0": int(round(step)),
            "tiles_seed": 100 + len(cases),
            "zero_rows": np.array([3] if tag == "mpp05_long" else [], np.int64),
        }
    # tiles sharing cells: coordinates with a 256-px stride and 512-px patch_size_lv0 (summed per cell)
    ij = lattice(rng, range(0, 12), range(0, 9), 0.8)
    cases["shared_cells"] = {
        "ij": ij,
        "mpp": 0.5,
        "x": ij[:, 0] * 256 + 7,
        "y": ij[:, 1] * 256 + 3,
        "patch_size_lv0": 512,
        "tiles_seed": 199,
        "zero_rows": np.array([], np.int64),
    }
    return cases


def tiles_for(case: dict) -> np.ndarray:
    tiles = (np.random.default_rng(case["tiles_seed"]).random((len(case["ij"]), 768)) * 2 - 1).astype(np.float32)
    tiles[case["zero_rows"]] = 0
    return tiles


def main(mirror: str) -> None:
    torch.set_num_threads(1)
    modeling, commit = import_official(Path(mirror))
    from titan_official.configuration_titan import TitanConfig

    with tempfile.TemporaryDirectory() as tmp:
        weights = write_random_weights(tmp, seed=WEIGHTS_SEED)
        from safetensors.torch import load_file

        release = load_file(str(weights))
        model = modeling.Titan(TitanConfig()).eval()
        vision = {k: v for k, v in release.items() if k.startswith(CHECKPOINT_PREFIX)}
        missing, unexpected = model.load_state_dict(vision, strict=True)
        assert not missing and not unexpected
        ours = TitanSlideNet().state_dict()
        official_shapes = {k[len(CHECKPOINT_PREFIX) :]: tuple(v.shape) for k, v in model.state_dict().items()}
        assert official_shapes == {k: tuple(v.shape) for k, v in ours.items()}, "state-dict layouts differ"
        out = {
            "weights_seed": WEIGHTS_SEED,
            "official_commit": commit,
            "weights_file_sha256": file_sha256(weights),
            "weights_digest": state_digest(random_titan_net(WEIGHTS_SEED).state_dict()),
            "official_n_params": sum(p.numel() for p in model.vision_encoder.parameters()),
        }
    for tag, case in make_cases(np.random.default_rng(2026)).items():
        tiles = tiles_for(case)
        coords = case["ij"] * case["patch_size_lv0"] if tag != "shared_cells" else np.stack([case["x"], case["y"]], 1)
        with torch.inference_mode():
            emb = model.encode_slide_from_patch_features(
                torch.from_numpy(tiles)[None], torch.from_numpy(coords)[None], case["patch_size_lv0"]
            )
        assert tuple(emb.shape) == (1, 768), emb.shape
        out.update({f"{tag}_{k}": v for k, v in case.items() if k != "ij"})
        out.update(
            {f"{tag}_official_coords": coords, f"{tag}_tiles_head": tiles[0, :8], f"{tag}_embedding": emb[0].numpy()}
        )
        print(tag, len(tiles), "tiles", emb[0, :4].tolist())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print("wrote", OUT)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/clemsgrs+unicorn_baseline/repo")
