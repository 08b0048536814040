"""DICOM WSI series read in place from S3 along the job's own path: bytes, requests, decodes, time.

Each series (IDC layout, ``<uuid>/<SOPInstanceUID>.dcm``, written by
:mod:`pathray.demo.dicomize` from one 4096x3072 synthetic SVS at 0.25 µm/px with levels
1/4/16 and 256-px JPEG tiles) is uploaded to a local SeaweedFS server behind the
byte-counting proxy of ``tests/fixtures/s3proxy.py``, so every byte and GET is counted where
it leaves the server. The tiling is 224 px at 0.5 µm/px with no tissue filter (all 54 grid
tiles: an all-tissue series; each tile is 448 level-0 px, halved), as the job runs it:

1. ``SlidePlanner`` opens the series, detects tissue on its lowest level and cuts the grid
   into chunks of ``chunk tiles``;
2. one ``ChunkReader`` (the job gives a reader every chunk of a slide) reads the chunks in
   order with ``read_tiles``, keeping the series open.

Reported for the reader: GET body bytes ÷ the series' bytes and ÷ the bytes of the unique
level-0 frames the tiles touch, GET requests, frame decodes (calls into imagecodecs' JPEG /
JPEG 2000 decoders) against the unique frames, and the wall time of all chunks (one process,
shared 2-core VM: indicative). The planner's own open and thumbnail read are listed apart.

    python benchmarks/dicom_io.py [--write docs/bench/dicom_io.md] [--baseline]

``--baseline`` leaves out the series older code cannot write (several fragments per frame,
DICOM-TIFF), for a run against an older checkout (``PYTHONPATH=<its tree>``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.s3 import _stop, find_weed, start_server  # noqa: E402
from fixtures.s3proxy import S3Proxy  # noqa: E402

from pathray.demo.dicomize import FrameLayout, write_dicom_series  # noqa: E402
from pathray.demo.synthetic import write_synthetic_svs  # noqa: E402
from pathray.tiling.grid import TilingConfig  # noqa: E402

CONFIG = TilingConfig(tile_px=224, target_mpp=0.5, min_tissue_fraction=0.0)
CHUNK_TILES = (8, 256)  # 256: the job's default (the whole grid in one chunk here)
#: name -> (codec, offset table, fragments per frame, dual-personality DICOM-TIFF)
SERIES = {
    "JPEG, BOT": ("jpeg", "basic", 1, False),
    "JPEG, no table": ("jpeg", "none", 1, False),
    "JPEG, no table, 2 fragments/frame": ("jpeg", "none", 2, False),
    "JPEG, no table, DICOM-TIFF": ("jpeg", "none", 1, True),
    "JPEG 2000, EOT": ("jpeg2000", "extended", 1, False),
}


class DecodeCounter:
    """Counts calls into imagecodecs' frame decoders (patched module attributes)."""

    def __init__(self) -> None:
        import imagecodecs

        self.calls = 0
        for name in ("jpeg8_decode", "jpeg2k_decode"):
            real = getattr(imagecodecs, name)
            setattr(imagecodecs, name, self._wrap(real))

    def _wrap(self, real):
        def decode(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        return decode


def unique_frames(directory: Path, chunks) -> tuple[int, int]:
    """``(count, codestream bytes)`` of the level-0 frames the chunks' tiles touch."""
    import pydicom
    from pydicom.encaps import generate_frames

    level0 = max(directory.glob("*.dcm"), key=lambda p: p.stat().st_size)
    ds = pydicom.dcmread(level0)
    sizes = [len(f) for f in generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))]
    across, tw, th = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns)), int(ds.Columns), int(ds.Rows)
    side = round(CONFIG.tile_px * CONFIG.target_mpp / 0.25)
    frames = set()
    for i in range(chunks.num_rows):
        x, y = (np.frombuffer(chunks.column(c)[i].as_py(), "<i8") for c in "xy")
        for x0, y0 in zip(x.tolist(), y.tolist()):
            frames.update(
                r * across + c
                for r in range(y0 // th, (y0 + side - 1) // th + 1)
                for c in range(x0 // tw, (x0 + side - 1) // tw + 1)
            )
    return len(frames), sum(sizes[f] for f in frames)


def measure(name: str, uri: str, directory: Path, proxy: S3Proxy, options: dict, decodes: DecodeCounter) -> list[dict]:
    import pyarrow as pa

    from pathray.job.rows import SLIDE_SCHEMA
    from pathray.job.stages import ChunkReader, SlidePlanner

    series_bytes = sum(p.stat().st_size for p in directory.iterdir())
    slides = pa.Table.from_pylist(
        [{"slide_id": "a", "path": uri, "cohort": "", "mpp_override": None, "models": ["m"]}], schema=SLIDE_SCHEMA
    )
    rows = []
    for chunk_tiles in CHUNK_TILES:
        proxy.reset()
        chunks = SlidePlanner(CONFIG, chunk_tiles, options)(slides)
        plan_bytes, plan_gets = sum(proxy.get_bytes.values()), sum(proxy.get_requests.values())
        frames, frame_bytes = unique_frames(directory, chunks)
        proxy.reset()
        decodes.calls = 0
        reader = ChunkReader(CONFIG, options)
        start = time.perf_counter()
        out = [reader.read_chunk(chunks.slice(i, 1)) for i in range(chunks.num_rows)]
        seconds = time.perf_counter() - start
        reader.close()
        assert all(t.column("status")[0].as_py() == "ok" for t in out), [t.column("error_message")[0] for t in out]
        got = sum(proxy.get_bytes.values())
        rows.append(
            {
                "series": name,
                "chunk_tiles": chunk_tiles,
                "chunks": chunks.num_rows,
                "tiles": sum(t.column("tiles_read")[0].as_py() for t in out),
                "series_mb": series_bytes / 1e6,
                "plan_kb": plan_bytes / 1e3,
                "plan_gets": plan_gets,
                "ratio_series": got / series_bytes,
                "ratio_frames": got / frame_bytes,
                "gets": sum(proxy.get_requests.values()),
                "decodes": decodes.calls,
                "frames": frames,
                "seconds": seconds,
            }
        )
    return rows


def make_series(work: Path, baseline: bool) -> list[tuple[str, Path]]:
    source = write_synthetic_svs(
        work / "synthetic.svs", (4096, 3072), mpp=0.25, tissue_rects=((448, 448, 1344, 896), (2688, 1792, 896, 896))
    )
    out = []
    for name, (codec, offset_table, fragments, tiff) in SERIES.items():
        if baseline and (fragments > 1 or tiff):
            continue
        layout = FrameLayout(fragments_per_frame=fragments, tiff_personality=tiff)
        out.append(
            (name, write_dicom_series(source, work / str(uuid.uuid4()), codec, offset_table, layout=layout).directory)
        )
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| series | series MB | chunk tiles | chunks | planner kB / GETs | reader bytes ÷ series | "
        "reader bytes ÷ unique frames | reader GETs | decodes / unique frames | reader s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['series']} | {r['series_mb']:.2f} | {r['chunk_tiles']} | {r['chunks']} | "
        f"{r['plan_kb']:.0f} / {r['plan_gets']} | {r['ratio_series']:.3f} | {r['ratio_frames']:.2f} | "
        f"{r['gets']} | {r['decodes']} / {r['frames']} | {r['seconds']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="write the table as Markdown here")
    parser.add_argument("--baseline", action="store_true", help="only the series older code can write")
    args = parser.parse_args()
    decodes = DecodeCounter()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(find_weed(), os.path.join(tmp, "s3"))
        proxy = S3Proxy(upstream=server.endpoint_url.split("://", 1)[1]).start()
        options = proxy.storage_options(server.storage_options)
        try:
            server.fs.mkdir("bench")
            rows = []
            for name, directory in make_series(Path(tmp), args.baseline):
                for path in directory.iterdir():
                    server.fs.put_file(str(path), f"bench/{directory.name}/{path.name}")
                rows += measure(name, f"s3://bench/{directory.name}/", directory, proxy, options, decodes)
        finally:
            proxy.stop()
            _stop(server.process)
    text = table(rows)
    print(text)
    if args.write:
        header = (
            f"# DICOM WSI read in place: bytes, requests and decodes of the job's reads\n\n"
            f"`python benchmarks/dicom_io.py`, {datetime.date.today()}, {platform.machine()} shared VM "
            f"(2 cores), local SeaweedFS.\n{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0]}\n"
        )
        Path(args.write).write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
