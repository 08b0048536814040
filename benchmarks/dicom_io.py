"""Bytes pulled from S3 per DICOM WSI series, read in place, as the reader count grows.

For each series (IDC layout on a local SeaweedFS server, made by ``pathray.demo.dicomize``):

1. a planner opens the series and reads its lowest level whole (tissue detection);
2. the tissue tiles (224 px at 0.5 µm/px, ≥ 25 % tissue) are split row-major into ``k``
   equal chunks, one per reader; each reader opens the series itself (headers + offset
   tables) and reads its tiles with one frame cache, as a pathray reader actor would.

Reported: bytes fetched (all opens + all frames) ÷ the series' total bytes, and range
requests, for k = 1, 2, 4, 8. Frames shared by two chunks are fetched by both readers, and
each reader pays the header/offset-table reads ("kB per open"), so the ratio can only grow
with k; the table shows by how much. Counted by :class:`pathray.rangeio.FetchStats` (bytes
requested = bytes received).

Reading it: on the pyramidal series the tissue read stays ≤ 1.0 up to 8 readers, but it is
not flat: these fixtures are 2 MB, so 8 x 56 kB of headers and the frames shared by chunk
boundaries are a visible share. IDC series are far larger (TCGA diagnostic series average
1.14 GB in the index); there a reader's open costs its headers plus the offset tables (4 or 8
bytes per frame), well under 1 % per reader, while the chunk-boundary share depends on the
job's chunking and was not measured on such a series here. The single-level CMU
series has no low-resolution level, so tissue detection reads level 0 whole (ratio 1.0 on
its own) and the readers then fetch the tissue frames again: ≈ 1 + tissue share. That is a
property of single-level slides, not of IDC's pyramids; a planner that handed its decoded
frames to the readers would remove it.

    python benchmarks/dicom_io.py [--write docs/bench/dicom_io.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

from pathray.demo.cmu import fetch_cmu_small_region
from pathray.demo.dicomize import write_dicom_series
from pathray.demo.synthetic import write_synthetic_svs
from pathray.dicom_wsi import open_dicom_series
from pathray.tissue import TissueConfig, TissueMask, tissue_mask_from_rgb

READERS = (1, 2, 4, 8)
TILE_PX, TARGET_MPP, MIN_TISSUE = 224, 0.5, 0.25


def tissue_tiles(uri: str, options: dict) -> tuple[list[tuple[int, int]], int, int]:
    """``(tiles, planner bytes, planner requests)``: level-0 ``(x, y)`` of the tissue tiles."""
    backend = open_dicom_series(uri, options)
    low = len(backend.level_dimensions) - 1
    rgb = backend.read_level(low, 0, 0, *backend.level_dimensions[low])
    mpp = float(backend.properties["openslide.mpp-x"])
    level0_per_px = backend.level_downsamples[low]
    mask, threshold = tissue_mask_from_rgb(rgb, mpp * level0_per_px, TissueConfig())
    tissue = TissueMask(mask, mpp * level0_per_px, level0_per_px, rgb, threshold)
    size = TILE_PX * TARGET_MPP / mpp
    width, height = backend.level_dimensions[0]
    xs, ys = np.meshgrid(np.arange(int(width // size)) * size, np.arange(int(height // size)) * size)
    x, y = np.round(xs.ravel()).astype(int), np.round(ys.ravel()).astype(int)
    keep = tissue.fraction(x, y, size) >= MIN_TISSUE
    return list(zip(x[keep].tolist(), y[keep].tolist())), backend.stats.bytes_fetched, backend.stats.requests


def readers_pull(uri: str, options: dict, tiles: list[tuple[int, int]], readers: int, size: int) -> tuple[int, int]:
    """Bytes and requests of ``readers`` readers, each opening the series and reading its chunk."""
    total_bytes = total_requests = 0
    for chunk in np.array_split(np.arange(len(tiles)), readers):
        backend = open_dicom_series(uri, options)
        cache: dict = {}
        for i in chunk:
            backend.read_level(0, tiles[i][0], tiles[i][1], size, size, cache)
        total_bytes += backend.stats.bytes_fetched
        total_requests += backend.stats.requests
    return total_bytes, total_requests


def measure(name: str, uri: str, options: dict, series_bytes: int) -> list[dict]:
    tiles, plan_bytes, plan_requests = tissue_tiles(uri, options)
    opened = open_dicom_series(uri, options)
    size = round(TILE_PX * TARGET_MPP / float(opened.properties["openslide.mpp-x"]))
    rows = []
    for k in READERS:
        got, requests = readers_pull(uri, options, tiles, k, size)
        rows.append({"series": name, "tiles": len(tiles), "readers": k, "series_mb": series_bytes / 1e6,
                     "open_kb": opened.stats.bytes_fetched / 1e3, "levels": len(opened.level_dimensions),
                     "ratio": (plan_bytes + got) / series_bytes, "requests": plan_requests + requests})
    return rows


def make_series(work: Path) -> list[tuple[str, Path]]:
    synthetic = write_synthetic_svs(work / "synthetic.svs", 8192, 6144, mpp=0.25,
                                    tissue_rects=((1024, 1024, 3072, 2048), (5120, 3584, 2048, 1536)))
    out = []
    for name, source, codec, table in (("synthetic 8192x6144, JPEG, BOT", synthetic, "jpeg", "basic"),
                                       ("synthetic 8192x6144, JPEG, no table", synthetic, "jpeg", "none"),
                                       ("CMU-1-Small-Region, JPEG 2000, EOT", fetch_cmu_small_region(), "jpeg2000", "extended")):
        out.append((name, write_dicom_series(source, work / str(uuid.uuid4()), codec, table).directory))
    return out


def table(rows: list[dict]) -> str:
    lines = [("| series | levels | series MB | kB per open | tissue tiles | readers | bytes pulled ÷ series bytes "
             "| range requests |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['series']} | {r['levels']} | {r['series_mb']:.1f} | {r['open_kb']:.0f} | {r['tiles']} | "
              f"{r['readers']} | {r['ratio']:.3f} | {r['requests']} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="write the table as Markdown here")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures.s3 import _stop, find_weed, start_server

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(find_weed(), os.path.join(tmp, "s3"))
        try:
            server.fs.mkdir("bench")
            rows = []
            for name, directory in make_series(Path(tmp)):
                for path in directory.iterdir():
                    server.fs.put_file(str(path), f"bench/{directory.name}/{path.name}")
                series_bytes = sum(p.stat().st_size for p in directory.iterdir())
                rows += measure(name, f"s3://bench/{directory.name}/", server.storage_options, series_bytes)
        finally:
            _stop(server.process)
    text = table(rows)
    print(text)
    if args.write:
        header = (f"# DICOM WSI read in place: bytes pulled per series\n\n`python benchmarks/dicom_io.py`, "
                  f"{datetime.date.today()}, {platform.machine()} shared VM (2 cores), local SeaweedFS.\n"
                  f"{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0]}\n")
        Path(args.write).write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
