"""Golden outputs of the official FEATHER (MIL-Lab ABMIL) code -> tests/data/feather_golden.npz.

Official code: github.com/mahmoodlab/MIL-Lab at COMMIT, ``src/models/abmil.py`` (+
``mil_template.py``, ``layers.py``). The model is loaded the way TRIDENT's ``feather`` loads the
HF repo (``AutoModel.from_pretrained(dir)`` resolves to ``ABMILModel``), with one stand-in:
transformers 5's ``from_pretrained`` needs ``post_init()``, which ``ABMILModel`` (written for
transformers 4) never calls, so the model is built as ``from_pretrained`` builds it
(``ABMILModel(ABMILGatedBaseConfig.from_pretrained(dir))``) and the same ``model.safetensors``
is loaded with ``load_state_dict(strict=True)`` (the keys ``from_pretrained`` matches, no
prefix handling); then ``eval()``; output ``model.forward_features(feats[None])[0]`` in fp32.

    cd <worktree> && PYTHONPATH=$PWD .venv/bin/python tests/reference/feather_golden.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official import DATA, extract, tile_embeddings  # noqa: E402

from pathray.slide_level.encoders.feather import write_random_weights  # noqa: E402
from pathray.slide_level.encoders.release import state_sha256  # noqa: E402

COMMIT = "dfc3c17ca6876a8f9bd33a9162c40f2c22631d9d"
WEIGHTS_SEED = 13
CASES = {"one": (301, 1), "few": (302, 5), "mid": (303, 257), "long": (304, 20_000)}
FILES = [
    "src/__init__.py",
    "src/models/__init__.py",
    "src/models/abmil.py",
    "src/models/mil_template.py",
    "src/models/layers.py",
]


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = extract("mahmoodlab+MIL-Lab", COMMIT, FILES, Path(tmp))
        sys.path.insert(0, str(root))
        from src.models.abmil import ABMILGatedBaseConfig, ABMILModel

        weights = write_random_weights(root / "release", seed=WEIGHTS_SEED)
        config = ABMILGatedBaseConfig.from_pretrained(str(root / "release"))
        model = ABMILModel(config)
        model.load_state_dict(load_file(str(weights)), strict=True)
        model.eval()
        out = {"weights_seed": WEIGHTS_SEED, "weights_sha256": state_sha256(load_file(str(weights))), "commit": COMMIT}
        with torch.no_grad():
            for tag, (seed, n) in CASES.items():
                feats = torch.from_numpy(tile_embeddings(seed, n, 768))[None]
                emb, _ = model.forward_features(feats)
                assert emb.shape == (1, 512)
                out.update({f"{tag}_seed": seed, f"{tag}_n": n, f"{tag}_output": emb[0].numpy()})
    np.savez(DATA / "feather_golden.npz", **out)
    print("wrote", DATA / "feather_golden.npz", {k: v for k, v in out.items() if not k.endswith("_output")})


if __name__ == "__main__":
    main()
