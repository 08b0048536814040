"""pathray's DICOM reader against wsidicom on the same series, read in place from S3.

Should ``wsidicom`` (fsspec, Basic/Extended/no offset table, HTJ2K, JPEG-LS) replace the
hand-written parser in :mod:`pathray.wsi.dicom`? Same series, server and byte-counting proxy
as ``benchmarks/dicom_io.py`` (4096x3072 synthetic slide at 0.25 µm/px, all 54 tiles of
224 px at 0.5 µm/px, i.e. 448 level-0 px windows halved). Each reader opens the series
(a fresh fsspec filesystem, no listing cache) and reads the 54 windows of level 0:

* pathray: ``open_slide`` + one ``read_tiles`` call (the job's reader path: block loader);
* wsidicom: ``WsiDicom.open(uri, file_options)`` + ``read_region`` per window (its own
  frame cache on), halved the same way.

Reported: GET bytes and requests (open + reads), wall seconds, and whether the 54 tiles
equal those read from the source SVS. wsidicom is not a dependency: install it to run this.

    python benchmarks/dicom_wsidicom.py [--write docs/bench/dicom_wsidicom.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dicom_io import CONFIG, make_series  # noqa: E402
from fixtures.s3 import _stop, find_weed, start_server  # noqa: E402
from fixtures.s3proxy import S3Proxy  # noqa: E402

from pathray.tiling.grid import plan_tiles, read_tiles, resize_tile  # noqa: E402
from pathray.wsi.slide import open_slide  # noqa: E402


def pathray_tiles(uri: str, options: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    slide = open_slide(uri, storage_options=options)
    return read_tiles(slide, CONFIG, x, y)


def wsidicom_tiles(uri: str, options: dict, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    from wsidicom import WsiDicom

    out = np.empty((x.size, CONFIG.tile_px, CONFIG.tile_px, 3), np.uint8)
    with WsiDicom.open(uri, file_options=options) as wsi:
        for i, (x0, y0) in enumerate(zip(x.tolist(), y.tolist())):
            region = np.asarray(wsi.read_region((x0, y0), 0, (side, side)).convert("RGB"))
            out[i] = resize_tile(region, CONFIG.tile_px)
    return out


def measure(name: str, uri: str, proxy: S3Proxy, options: dict, source: Path) -> list[dict]:
    reference = open_slide(str(source))
    grid = plan_tiles(reference, "a", CONFIG)
    want = read_tiles(reference, CONFIG, grid.x, grid.y)
    side = round(CONFIG.tile_px * CONFIG.target_mpp / reference.mpp)
    rows = []
    for reader in ("pathray", "wsidicom"):
        proxy.reset()
        start = time.perf_counter()
        try:
            got = (
                pathray_tiles(uri, options, grid.x, grid.y)
                if reader == "pathray"
                else wsidicom_tiles(uri, options, grid.x, grid.y, side)
            )
            verdict = "equal" if np.array_equal(got, want) else f"differ (max {np.abs(got.astype(int) - want).max()})"
        except Exception as exc:  # noqa: BLE001 - a reader that fails is a result
            verdict = f"fails: {type(exc).__name__}: {str(exc)[:80]}"
        rows.append(
            {
                "series": name,
                "reader": reader,
                "kb": sum(proxy.get_bytes.values()) / 1e3,
                "gets": sum(proxy.get_requests.values()),
                "seconds": time.perf_counter() - start,
                "tiles": verdict,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="write the table as Markdown here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(find_weed(), os.path.join(tmp, "s3"))
        proxy = S3Proxy(upstream=server.endpoint_url.split("://", 1)[1]).start()
        options = {**proxy.storage_options(server.storage_options), "use_listings_cache": False}
        try:
            server.fs.mkdir("bench")
            rows = []
            for name, directory in make_series(Path(tmp), baseline=False):
                for path in directory.iterdir():
                    server.fs.put_file(str(path), f"bench/{directory.name}/{path.name}")
                rows += measure(name, f"s3://bench/{directory.name}/", proxy, options, Path(tmp) / "synthetic.svs")
        finally:
            proxy.stop()
            _stop(server.process)
    lines = [
        "| series | reader | kB pulled | GETs | seconds | 54 tiles vs source SVS |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    lines += [
        f"| {r['series']} | {r['reader']} | {r['kb']:.0f} | {r['gets']} | {r['seconds']:.2f} | {r['tiles']} |"
        for r in rows
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        import wsidicom

        header = (
            f"# pathray's DICOM reader vs wsidicom {wsidicom.__version__}\n\n`python benchmarks/dicom_wsidicom.py`, "
            f"{datetime.date.today()}, {platform.machine()} shared VM (2 cores), local SeaweedFS.\n"
            f"{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0]}\n"
        )
        Path(args.write).write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
