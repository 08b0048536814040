"""What a person sees of a run: the terminal output of `pathray embed` / `pathray aggregate` /
`pathray demo` on the demo slides (no warning line on a clean run, ~40 lines at most, the
last naming the run's page), the run's log file holding the rest, and
``_runs/<run_id>/report.html`` as a real browser (headless Chromium) renders it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pathray.cli.demo import DEMO_MODEL, build_demo
from pathray.monitor.html import RunPage, render

pytestmark = pytest.mark.timeout(600)

#: a terminal line that is a warning or an error (Python's, Ray's Python or C++ loggers')
NOISE = re.compile(r"\bWARN(ING)?\b|\bERROR\b|Warning\b|[Dd]eprecat|Traceback|\] [EW] |core_worker")
MAX_LINES = 40


def _pathray(*args: str, cwd: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pathray.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _assert_clean_and_short(out: subprocess.CompletedProcess) -> None:
    noisy = [line for line in out.stderr.splitlines() if NOISE.search(line)]
    assert not noisy, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) <= MAX_LINES, out.stdout + out.stderr
    assert re.fullmatch(r"Run report: .*/_runs/[^/]+/report\.html", out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def demo_embed(tmp_path_factory):
    """`pathray embed --runner local` on the demo's three synthetic slides: (process, store)."""
    directory = tmp_path_factory.mktemp("demo")
    manifest, weights = build_demo(directory, with_cmu=False)
    out = _pathray(
        "embed",
        "--manifest",
        str(manifest),
        "--models",
        DEMO_MODEL,
        "--weights",
        f"{DEMO_MODEL}={weights}",
        "--out",
        str(directory / "store"),
        "--runner",
        "local",
        cwd=directory,
    )
    assert out.returncode == 0, out.stderr
    return out, directory / "store"


@pytest.mark.slow  # `pathray demo` runs (demo_embed) and a browser
def test_clean_local_run_prints_no_warning_and_names_its_page(demo_embed):
    out, store = demo_embed
    _assert_clean_and_short(out)
    run_dir = Path(out.stdout.splitlines()[-1].removeprefix("Run report: ")).parent
    assert run_dir.parent == store / "_runs" and (run_dir / "report.json").exists()
    log = (run_dir / "run.log").read_text()
    assert "runner: local" in log and "QC gallery: 3 slides" in log  # the log lines went to the file
    assert f"Run log: {run_dir / 'run.log'}" in out.stdout


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is missing: scripts/setup.sh installs it (Debian package 'chromium')")
    return exe


def _browser(url: str, tmp_path: Path, *args: str) -> str:
    """Run headless Chromium on ``url`` with ``args``; returns its stdout."""
    out = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


class _Dom(HTMLParser):
    """Ids of sections, table rows of the slide table, images and links of the dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.rows: list[list[str]] = []
        self.hidden: list[bool] = []  # per row: hidden by the page's filter
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._in_body = self._in_slides = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "table":
            self._in_slides = a.get("id") == "slide-table"
        if tag == "tbody" and self._in_slides:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
            self.hidden.append("display: none" in a.get("style", ""))
        elif tag == "img":
            self.images.append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_body and self.rows and data.strip():
            self.rows[-1].append(data.strip())


@pytest.mark.slow  # `pathray demo` runs (demo_embed) and a browser
def test_report_page_in_a_real_browser(demo_embed, tmp_path):
    out, store = demo_embed
    page = Path(out.stdout.splitlines()[-1].removeprefix("Run report: "))
    dom = _Dom()
    dom.feed(_browser(page.as_uri(), tmp_path, "--dump-dom"))
    assert {"summary", "throughput", "errors", "slides", "qc", "slide-table", "filter"} <= set(dom.ids)
    text = " ".join(dom.text)
    assert "Wall time" in text and "40 planned, 40 read, 40 written" in text and "No errors." in text
    assert sorted(r[0] for r in dom.rows) == ["synthetic-a", "synthetic-b", "synthetic-c"]
    assert all(r[1:4] == [DEMO_MODEL, "ok", r[3]] and int(r[3]) > 0 for r in dom.rows)
    assert len(dom.images) == 3 and all(i["src"].startswith("data:image/png;base64,") for i in dom.images)
    for link in dom.links:  # each thumbnail links to the full QC image written next to the page
        assert (page.parent / link).exists() and Image.open(page.parent / link).size[0] >= 1024
    shot = tmp_path / "report.png"
    _browser(page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,1400")
    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1200, 1400) and pixels.getextrema()[0] < 64  # drawn, not a blank page


def test_errors_are_grouped_by_type_with_their_slides(tmp_path):
    rows = [
        dict(slide_id=s, model="m", status="error", n_tiles=0, error_type=t, error_message=f"{s} broke")
        for s, t in (("b", "SlideOpenError"), ("a", "SlideOpenError"), ("c", "TileReadError"))
    ]
    rows.append(dict(slide_id="d", model="m", status="ok", n_tiles=12, error_type="", error_message=""))
    path = tmp_path / "page.html"
    path.write_text(render(RunPage("run", [("Run", "r")], slides=rows, slides_total=4)))
    dom = _Dom()
    dom.feed(_browser(path.as_uri(), tmp_path, "--dump-dom"))
    text = " ".join(t.strip() for t in dom.text if t.strip())
    assert "SlideOpenError (2): a, b" in text and "TileReadError (1): c" in text
    assert len(dom.rows) == 4 and "Too short a run to plot." in text
    # the table's script: sort by tiles, descending, and filter, as a link's fragment asks
    dom = _Dom()
    dom.feed(_browser(path.as_uri() + "#filter=slideopen&sort=-0", tmp_path, "--dump-dom"))
    assert [r[0] for r in dom.rows] == ["d", "c", "b", "a"]
    assert [r[0] for r, hidden in zip(dom.rows, dom.hidden) if not hidden] == ["b", "a"]


@pytest.mark.slow  # `pathray demo` runs (demo_embed) and a browser
def test_aggregate_run_is_as_quiet_and_has_its_page(demo_embed, tmp_path):
    _, store = demo_embed
    out = _pathray(
        "aggregate",
        "--store",
        str(store),
        "--model",
        DEMO_MODEL,
        "--aggregator",
        "mean",
        "--runner",
        "local",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    _assert_clean_and_short(out)
    page = Path(out.stdout.splitlines()[-1].removeprefix("Run report: "))
    dom = _Dom()
    dom.feed(page.read_text())
    assert sorted(r[0] for r in dom.rows) == ["synthetic-a", "synthetic-b", "synthetic-c"]
    assert (page.parent / "run.log").exists()


@pytest.mark.slow
def test_clean_ray_demo_prints_no_warning(tmp_path):
    """`pathray demo` on a local Ray: Ray's start-up, Ray Data's progress and the core worker's
    known actor warning (ray-project/ray#53727) stay in the run's log, off the terminal."""
    out = _pathray("demo", "--dir", str(tmp_path), "--no-cmu", "--num-cpus", "2", cwd=tmp_path, timeout=540)
    assert out.returncode == 0, out.stderr
    _assert_clean_and_short(out)
    run_dir = Path(out.stdout.splitlines()[-1].removeprefix("Run report: ")).parent
    log = (run_dir / "run.log").read_text()
    assert "resources:" in log and "Started a local Ray instance" in log
