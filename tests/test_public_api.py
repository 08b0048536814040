"""The package's public face (`import pathray`): list models, embed, open a store, aggregate —
on a real slide with the in-process runner, and without importing Ray or torch at import time."""

from __future__ import annotations

import subprocess
import sys

from fixtures.slides import write_manifest

import pathray
from pathray.encoders.registry import REGISTRY


def test_import_pathray_is_light():
    code = "import sys, pathray; print(sorted(m for m in ('ray', 'torch', 'timm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_list_models_is_the_registry():
    assert pathray.list_models() == list(REGISTRY) and "uni2-h" in pathray.list_models()


def test_embed_open_store_and_aggregate(synthetic_svs_05, kaiko_vits16_weights, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"slide_id": "s", "path": str(synthetic_svs_05)}])
    out = str(tmp_path / "store")
    report = pathray.embed(
        str(manifest),
        out,
        ["kaiko-vits16"],
        runner="local",
        encoders={"kaiko-vits16": {"weights": str(kaiko_vits16_weights)}},
    )
    assert report.exit_code == 0
    store = pathray.open_store(out)
    assert store.committed("kaiko-vits16") == {"s"}
    assert store.dataset("kaiko-vits16").count_rows() == store.commit_record("kaiko-vits16", "s").n_tiles > 0
    done = pathray.aggregate(out, "kaiko-vits16", "mean", runner="local")
    assert done.exit_code == 0 and store.aggregated("kaiko-vits16", "mean") == {"s"}
