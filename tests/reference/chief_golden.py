"""Golden outputs of the official CHIEF code -> tests/data/chief_golden.npz.

Official code: github.com/hms-dbmi/CHIEF at COMMIT, ``models/CHIEF.py`` (+ ``utils/utils.py``),
model built as ``Get_CHIEF_WSI_level_feature.py`` does (``CHIEF(size_arg="small",
dropout=True, n_classes=2)``, ``load_state_dict(td, strict=True)``, ``eval()``), output
``model(x, torch.tensor([site]))["WSI_feature"]``. Stand-ins: ``addict`` (used only by
``read_yaml``) is an empty module; the constructor's ``torch.load('./model_weight/Text_emdding.pth')``
reads a random 19 x 768 table written here (the checkpoint's ``organ_embedding`` replaces it).

    cd <worktree> && PYTHONPATH=$PWD .venv/bin/python tests/reference/chief_golden.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official import DATA, extract, stub_module, tile_embeddings  # noqa: E402

from pathray.slide_level.encoders.chief import write_random_weights  # noqa: E402
from pathray.slide_level.encoders.release import state_sha256  # noqa: E402

COMMIT = "1abed334e674ad2b6ee0430d1ce7d0b566420bb4"
WEIGHTS_SEED = 11
CASES = {"one": (101, 1), "few": (102, 5), "mid": (103, 257), "long": (104, 20_000)}


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = extract("hms-dbmi+CHIEF", COMMIT, ["models/CHIEF.py", "utils/utils.py"], Path(tmp))
        (root / "models" / "__init__.py").touch()
        (root / "utils" / "__init__.py").touch()
        (root / "model_weight").mkdir()
        torch.save(torch.randn(19, 768), root / "model_weight" / "Text_emdding.pth")
        stub_module("addict", Dict=dict)
        sys.path.insert(0, str(root))
        os.chdir(root)
        from models.CHIEF import CHIEF

        weights = write_random_weights(root, seed=WEIGHTS_SEED)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = CHIEF(size_arg="small", dropout=True, n_classes=2)
        model.load_state_dict(state, strict=True)
        model.eval()
        out = {"weights_seed": WEIGHTS_SEED, "weights_sha256": state_sha256(state), "commit": COMMIT}
        with torch.no_grad():
            for tag, (seed, n) in CASES.items():
                x = torch.from_numpy(tile_embeddings(seed, n, 768))
                feature = model(x, torch.tensor([13]))["WSI_feature"]
                assert feature.shape == (1, 768)
                other_site = model(x, torch.tensor([0]))["WSI_feature"]
                assert torch.equal(feature, other_site)  # the site does not enter WSI_feature
                out.update({f"{tag}_seed": seed, f"{tag}_n": n, f"{tag}_output": feature[0].numpy()})
    np.savez(DATA / "chief_golden.npz", **out)
    print("wrote", DATA / "chief_golden.npz", {k: v for k, v in out.items() if not k.endswith("_output")})


if __name__ == "__main__":
    main()
