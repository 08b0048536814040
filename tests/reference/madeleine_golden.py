"""Golden outputs of the official MADELEINE code -> tests/data/madeleine_golden.npz.

Official code: github.com/mahmoodlab/MADELEINE at COMMIT, ``madeleine/models/Model.py`` and
``abmil.py``; the model is built and loaded by the official ``create_model(model_cfg,
device="cpu", checkpoint_path=<model.pt>)`` (``stain_encoding=False``, DDP ``module.`` prefix
stripped, ``load_state_dict(strict=True)``) from the ``model_config.json`` pathray writes, then
``eval()``; output ``model.encode_he(feats[None], "cpu")`` in fp32 (the official run autocasts
on CUDA). No stand-ins.

    cd <worktree> && PYTHONPATH=$PWD .venv/bin/python tests/reference/madeleine_golden.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official import DATA, extract, tile_embeddings  # noqa: E402

from pathray.slide_level.encoders.madeleine import write_random_weights  # noqa: E402
from pathray.slide_level.encoders.release import state_sha256  # noqa: E402

COMMIT = "419287dc60a57296d959840b893481019c4f0d21"
WEIGHTS_SEED = 12
CASES = {"one": (201, 1), "few": (202, 5), "mid": (203, 257), "long": (204, 20_000)}
FILES = [
    "madeleine/__init__.py",
    "madeleine/models/__init__.py",
    "madeleine/models/Model.py",
    "madeleine/models/abmil.py",
]


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = extract("mahmoodlab+MADELEINE", COMMIT, FILES, Path(tmp))
        sys.path.insert(0, str(root))
        from madeleine.models.Model import create_model

        weights = write_random_weights(root / "release", seed=WEIGHTS_SEED)
        config = Namespace(**json.loads((root / "release" / "model_config.json").read_text()))
        model = create_model(config, device="cpu", checkpoint_path=str(weights)).eval()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        out = {"weights_seed": WEIGHTS_SEED, "weights_sha256": state_sha256(state), "commit": COMMIT}
        with torch.no_grad():
            for tag, (seed, n) in CASES.items():
                feats = torch.from_numpy(tile_embeddings(seed, n, 512))[None]
                emb = model.encode_he(feats, "cpu")
                assert emb.shape == (1, 512)
                out.update({f"{tag}_seed": seed, f"{tag}_n": n, f"{tag}_output": emb[0].numpy()})
    np.savez(DATA / "madeleine_golden.npz", **out)
    print("wrote", DATA / "madeleine_golden.npz", {k: v for k, v in out.items() if not k.endswith("_output")})


if __name__ == "__main__":
    main()
