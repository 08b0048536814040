"""Golden outputs of the official PRISM Perceiver code -> tests/data/prism_golden.npz.

Official code: ``prism_embedder/models/prism/perceiver.py`` and ``configuring_prism.py`` of
github.com/clemsgrs/prism-embedder at COMMIT (Paige's PRISM modelling code as on the hub repo
``paige-ai/Prism``), ``PerceiverResampler(PerceiverConfig())`` (the defaults equal the hub
``config.json``'s ``perceiver_config``), output ``resampler(tiles[None])["image_embedding"][0]``
as ``Prism.slide_representations`` returns it, fp32 on CPU, default (unset)
``PERCEIVER_MEM_EFF_ATTN``. Weights: pathray's random ``model.safetensors`` (release layout,
``image_resampler.`` prefix, each shared tensor stored once), loaded with the prefix removed by
``load_state_dict(strict=False)``: no unexpected key, and every missing key names a tensor
shared with a loaded one (checked). Stand-ins: the package ``__init__`` files are empty (the
official ones import timm/wholeslidedata models unrelated to the Perceiver) and ``environs``,
used only to read ``PERCEIVER_MEM_EFF_ATTN``, is a stub returning its default.

    cd <worktree> && PYTHONPATH=$PWD .venv/bin/python tests/reference/prism_golden.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official import DATA, extract, stub_module, tile_embeddings  # noqa: E402

from pathray.slide_level.encoders.prism import write_random_weights  # noqa: E402
from pathray.slide_level.encoders.release import state_sha256  # noqa: E402

COMMIT = "7022cf08845f92e90f2e2e78d55db4344f6793ba"
WEIGHTS_SEED = 14
CASES = {"one": (401, 1), "few": (402, 7), "mid": (403, 300), "long": (404, 4_000)}
FILES = ["prism_embedder/models/prism/perceiver.py", "prism_embedder/models/prism/configuring_prism.py"]


class _Env:
    def bool(self, name, default=False):
        return default


def official_resampler(root: Path, weights: Path):
    from prism_embedder.models.prism.configuring_prism import PerceiverConfig
    from prism_embedder.models.prism.perceiver import PerceiverResampler

    model = PerceiverResampler(PerceiverConfig())
    state = {
        k[len("image_resampler.") :]: v for k, v in load_file(str(weights)).items() if k.startswith("image_resampler.")
    }
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    by_id = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), []).append(name)
    for names in by_id.values():
        assert any(n in state for n in names), names  # each tensor loaded under one of its names
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = extract("clemsgrs+prism-embedder", COMMIT, FILES, Path(tmp))
        for package in ("prism_embedder", "prism_embedder/models", "prism_embedder/models/prism"):
            (root / package / "__init__.py").touch()
        stub_module("environs", Env=_Env)
        sys.path.insert(0, str(root))
        weights = write_random_weights(root / "release", seed=WEIGHTS_SEED)
        model = official_resampler(root, weights)
        out = {"weights_seed": WEIGHTS_SEED, "weights_sha256": state_sha256(load_file(str(weights))), "commit": COMMIT}
        with torch.no_grad():
            for tag, (seed, n) in CASES.items():
                emb = model(torch.from_numpy(tile_embeddings(seed, n, 2560))[None])["image_embedding"]
                assert emb.shape == (1, 1280)
                out.update({f"{tag}_seed": seed, f"{tag}_n": n, f"{tag}_output": emb[0].numpy()})
                print(tag, n, flush=True)
    np.savez(DATA / "prism_golden.npz", **out)
    print("wrote", DATA / "prism_golden.npz", {k: v for k, v in out.items() if not k.endswith("_output")})


if __name__ == "__main__":
    main()
