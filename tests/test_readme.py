"""The README stays true: its notebook query runs on a real store, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from pathray.testing import FakeSlide, TileLayout, build_store

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def make_store(root: Path, model: str = "kaiko-vits16", dim: int = 384) -> None:
    facts = {"mpp": 0.5, "vendor": "aperio"}
    slides = [
        FakeSlide(slide_id, n_tiles=n, cohort=cohort, seed=k, status=facts)
        for k, (slide_id, cohort, n) in enumerate((("s1", "A", 3), ("s2", "B", 2)))
    ]
    build_store(str(root), model, slides, dim, TileLayout(size_level0_px=224.0))


def test_notebook_query_runs_on_a_store_with_two_models_of_different_widths(tmp_path):
    make_store(tmp_path / "store")
    make_store(tmp_path / "store", model="uni", dim=1024)
    block = README.split("### Querying it from a notebook")[1].split("```python\n")[1].split("```")[0]
    assert 'root = "demo-out/store"' in block
    scope: dict = {}
    exec(block.replace('root = "demo-out/store"', f'root = "{tmp_path / "store"}"'), scope)
    assert scope["tiles"].num_rows == 5
    assert sorted(scope["per_model"]["tiles"]) == [5, 5]
    assert sorted(scope["slides"].column("n_tiles").to_pylist()) == [2, 3]
    assert len(scope["status"]) == 2 and len(scope["errors"]) == 0


def test_ci_runs_exactly_the_readme_test_command():
    commands = README.split("## Two commands")[1].split("```bash\n")[1].split("```")[0]
    test_command = re.search(r"^(bash scripts/test\.sh)\b", commands, re.M).group(1)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
    assert (ROOT / "scripts" / "demo.sh").exists() and "pathray demo" in (ROOT / "scripts" / "demo.sh").read_text()


def test_the_query_pathray_embed_prints_runs_on_a_two_model_store(tmp_path, capsys):
    from pathray.cli.embed import SAMPLE_QUERY

    make_store(tmp_path / "store")
    make_store(tmp_path / "store", model="uni", dim=1024)
    for model in ("kaiko-vits16", "uni"):
        exec(SAMPLE_QUERY.format(root=tmp_path / "store", model=model), {})
        assert "slide_id" in capsys.readouterr().out
