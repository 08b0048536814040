"""S3 I/O of slide reading: bytes fetched per slide, time to first tile, tiles/s S3 vs local.

Runs against a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1, as the tests use)
with a byte-counting HTTP proxy in front of it (``tests/fixtures/s3proxy.py``), so every
byte is counted where it leaves the server. The slide is real H&E (CMU-1-Small-Region,
CC0) tiled 3x3 into a 6660x8901 px pyramidal SVS declared at 0.25 µm/px (JPEG q95,
levels 1/4/16) and the same pixels as a deflate-compressed generic TIFF, a format the
range reader declines and which is therefore staged.

**Bytes per slide** mirror the job's I/O: one planner process opens the slide and plans tiles
(224 px at 0.5 µm/px, default tissue filter); the grid is cut into chunks of each of
``--chunk-tiles`` tiles and one reader *process* reads them in order with ``read_tiles``,
keeping the slide open, exactly like ``ChunkReader`` (the job gives one reader every chunk of
a slide). Modes: SVS read by range; deflate TIFF staged into the node-wide cache (both
processes share one directory); deflate TIFF staged into a private scratch per process (the
behaviour before the node cache).

**Time to first tile** of a larger SVS (CMU repeated 8x8): open + plan + first tile by range
vs staging the SVS whole first, on localhost and through the proxy emulating one remote
stream (bandwidth + latency, stated in the table); bytes moved before it. **Tiles/s**:
every grid tile of the SVS read by one caller thread from S3 by range and from the
local file, interleaved, best of ``--repeats``.

    python benchmarks/s3_io.py [--write docs/bench/s3_io.md]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.s3 import find_weed, start_server  # noqa: E402
from fixtures.s3proxy import S3Proxy  # noqa: E402

from pathray.demo.cmu import fetch_cmu_small_region  # noqa: E402
from pathray.demo.synthetic import write_svs  # noqa: E402
from pathray.tiling.grid import TilingConfig, plan_tiles, read_tiles  # noqa: E402
from pathray.wsi.scratch import Scratch  # noqa: E402
from pathray.wsi.slide import open_slide  # noqa: E402

CONFIG = TilingConfig(tile_px=224, target_mpp=0.5)
BUCKET = "pathray-bench-s3io"


def make_slides(directory: Path) -> tuple[Path, Path]:
    """The tiled CMU image as an SVS (range-read) and as a deflate generic TIFF (staged)."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(fetch_cmu_small_region()) as tif:
        cmu = tif.pages[0].asarray()[..., :3]
    image = np.tile(cmu, (3, 3, 1))
    svs = write_svs(directory / "cmu3x3.svs", image, 0.25, (1, 4, 16))
    deflate = directory / "cmu3x3_deflate.tif"
    with tifffile.TiffWriter(deflate) as out:
        out.write(
            image,
            tile=(256, 256),
            compression="zlib",
            photometric="rgb",
            resolution=(40000, 40000),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
        for factor in (4, 16):
            small = np.asarray(Image.fromarray(image).reduce(factor))
            out.write(small, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1, metadata=None)
    return svs, deflate


def write_large_svs(path: Path, repeat: int) -> Path:
    """CMU-1-Small-Region repeated ``repeat`` x ``repeat`` as a pyramidal SVS (levels 1/4/16), written tile by
    tile so the whole image is never in memory; lower levels repeat the downsampled CMU image."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(fetch_cmu_small_region()) as tif:
        cmu = tif.pages[0].asarray()[..., :3]
    height, width = cmu.shape[0] * repeat, cmu.shape[1] * repeat
    description = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=95"
        "|AppMag = 40|MPP = 0.25"
    )
    with tifffile.TiffWriter(path, bigtiff=False) as out:
        for i, factor in enumerate((1, 4, 16)):
            base = cmu if factor == 1 else np.asarray(Image.fromarray(cmu).reduce(factor))
            h, w = height // factor, width // factor
            tiles = (
                base[np.ix_(np.arange(y, y + 256) % base.shape[0], np.arange(x, x + 256) % base.shape[1])]
                for y in range(0, h, 256)
                for x in range(0, w, 256)
            )
            out.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 95},
                photometric="rgb",
                description=description if i == 0 else None,
                metadata=None,
                subfiletype=0 if i == 0 else 1,
            )
    return path


def reader(args: tuple) -> int:
    """One reader process: open the slide once, read its chunks in order; returns tiles read."""
    uri, options, scratch_root, chunks, barrier = args
    barrier.wait(timeout=120)
    scratch = Scratch(scratch_root) if scratch_root else None
    count = 0
    with open_slide(uri, scratch=scratch, storage_options=options) as slide:
        for xs, ys in chunks:
            count += len(read_tiles(slide, CONFIG, np.asarray(xs), np.asarray(ys)))
    return count


def bytes_per_slide(
    proxy: S3Proxy, base_options: dict, uri: str, key: str, size: int, mode: str, chunk_tiles: int, work: Path
) -> dict[str, float]:
    """Planner + one reader process over one slide; bytes ÷ object size."""
    options = proxy.storage_options(base_options)
    readers = 1
    node = work / f"node-{mode}-{chunk_tiles}"
    scratch_root = str(node) if mode == "node cache" else None
    proxy.reset()
    planner_scratch = Scratch(scratch_root) if scratch_root else Scratch()
    with open_slide(uri, scratch=planner_scratch, storage_options=options) as slide:
        grid = plan_tiles(slide, "bench", CONFIG)
    if not scratch_root:
        planner_scratch.close()
    planned = proxy.bytes_for(key)
    chunks = [
        (grid.x[i : i + chunk_tiles].tolist(), grid.y[i : i + chunk_tiles].tolist())
        for i in range(0, len(grid), chunk_tiles)
    ]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(readers)
        jobs = [(uri, options, scratch_root, chunks, barrier)]
        with ctx.Pool(readers) as pool:
            tiles = sum(pool.map(reader, jobs))
    assert tiles == len(grid)
    shutil.rmtree(node, ignore_errors=True)
    total = proxy.bytes_for(key)
    return {
        "plan": planned / size,
        "read": (total - planned) / size,
        "total": total / size,
        "chunks": len(chunks),
        "tiles": tiles,
    }


def read_floor(local: Path, size: int) -> float:
    """Bytes of the stored JPEG tiles the grid's reads touch ÷ object size (the least any reader set can fetch)."""
    import fsspec

    from pathray.tiling.grid import read_geometry
    from pathray.wsi.tiffrange import TiffRangeBackend

    with open_slide(str(local)) as slide:
        grid = plan_tiles(slide, "bench", CONFIG)
        level, n = read_geometry(slide, CONFIG)
        ds = slide.level_downsamples[level]
    tiled = TiffRangeBackend.open(fsspec.filesystem("file"), str(local), size).levels[level]
    touched = {i for x, y in zip(grid.x, grid.y) for i in tiled.tile_indices(round(x / ds), round(y / ds), n, n)}
    return float(sum(int(tiled.counts[i]) for i in touched)) / size


def first_tile(server, proxy: S3Proxy, uri: str, key: str, link: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Seconds from nothing to the first tile (open, plan, read one tile), by range vs staging the SVS whole,
    on localhost and through the proxy emulating ``link`` = (bytes/s per connection, latency s); bytes moved."""
    from pathray.fs import split_uri

    emulated = proxy.storage_options(server.storage_options)
    emulated["skip_instance_cache"] = False  # one client, built before timing
    for options in (server.storage_options, emulated):
        fs, path = split_uri(uri, options)
        fs.info(path)
    out: dict[str, dict[str, float]] = {}
    passes = [
        (m, s, o)
        for m in ("range", "staging")
        for s, o in (("localhost", server.storage_options), ("emulated", emulated))
    ]
    for mode, setting, options in passes * 2:  # the first round warms imports and caches; the second is kept
        proxy.link_bytes_per_s, proxy.latency_s = link if setting == "emulated" else (0.0, 0.0)
        proxy.reset()
        start = time.perf_counter()
        with Scratch() as scratch:
            slide = (
                open_slide(uri, storage_options=options)
                if mode == "range"
                else open_slide(scratch.stage(uri, options).local_path)
            )
            with slide:
                grid = plan_tiles(slide, "bench", CONFIG)
                read_tiles(slide, CONFIG, grid.x[:1], grid.y[:1])
                out.setdefault(mode, {})[setting] = time.perf_counter() - start
        if setting == "emulated":
            out[mode]["bytes"] = proxy.bytes_for(key)
    proxy.link_bytes_per_s, proxy.latency_s = 0.0, 0.0
    return out


def tiles_per_s(server, uri: str, local: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Every grid tile of the slide, one thread: S3 by range vs local file (best of ``repeats``)."""
    best = {"s3": {"wall": np.inf, "cpu": np.inf}, "local": {"wall": np.inf, "cpu": np.inf}}
    with open_slide(str(local)) as slide:
        grid = plan_tiles(slide, "bench", CONFIG)
    for _ in range(repeats):
        for name, target in (("s3", uri), ("local", str(local))):
            with open_slide(target, storage_options=server.storage_options) as slide:
                wall, cpu = time.perf_counter(), time.process_time()
                read_tiles(slide, CONFIG, grid.x, grid.y)
                best[name]["wall"] = min(best[name]["wall"], time.perf_counter() - wall)
                best[name]["cpu"] = min(best[name]["cpu"], time.process_time() - cpu)
    return {
        name: {"tiles_s": len(grid) / b["wall"], "tiles_cpu_s": len(grid) / b["cpu"], "tiles": len(grid)}
        for name, b in best.items()
    }


def markdown(results: dict, sizes: dict[str, int], args: argparse.Namespace) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# S3 slide I/O",
        "",
        (
            f"Generated by `python benchmarks/s3_io.py` on {when}; machine: {args.machine} ({platform.machine()}), "
            f"Python {platform.python_version()}. S3 = SeaweedFS `weed mini` on 127.0.0.1 behind a byte-counting proxy "
            "(bytes counted as the server sends them). Slide: CMU-1-Small-Region tiled 3x3 (6660x8901 px, declared "
            f"0.25 µm/px): SVS {sizes['svs'] / 2**20:.1f} MiB (range-read), deflate generic TIFF "
            f"{sizes['deflate'] / 2**20:.1f} MiB (staged). Tiles 224 px at 0.5 µm/px."
        ),
        "",
        "## Bytes fetched from S3 per slide ÷ object size",
        "",
        (
            "One planner process, then one reader process reading every chunk of the slide in order (as the job "
            "does: a reader takes a planned slide whole), at several chunk sizes. The reader keeps the spans it "
            "fetched recently (32 MiB per open slide), so the stored tiles two neighbouring chunks share are "
            "fetched once."
        ),
        "",
        (
            f"The floor for the SVS is {results['floor']:.3f}: the bytes of the stored JPEG tiles that the "
            "tissue tiles overlap ÷ object size (tissue covers most of this slide's non-white, i.e. most of its bytes)."
        ),
        "",
        "| format, how read | tiles per chunk | chunks | planner | reader | **total** |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (label, chunk_tiles), r in results["bytes"].items():
        lines.append(
            f"| {label} | {chunk_tiles} | {r['chunks']} | {r['plan']:.3f} | {r['read']:.3f} | **{r['total']:.3f}** |"
        )
    ft = results["first_tile"]
    rate, latency = args.link_mb_s, args.link_latency_ms
    lines += [
        "",
        f"## Time to first tile (large SVS, {sizes['large'] / 2**20:.0f} MiB, nothing cached)",
        "",
        (
            f"CMU-1-Small-Region repeated {args.large_repeat}x{args.large_repeat} as a 3-level SVS. From nothing to the "
            "first tile: open, plan (tissue detection on level 2), read the grid's first tile. *Emulated link*: the "
            f"proxy paces each response at {rate:g} MB/s and adds {latency:g} ms before each request, a stand-in for one "
            "S3 stream (not a measurement of S3 itself). s3fs downloads a staged object in parts over up to 10 "
            "connections, each paced separately, so staging gets up to 10x that rate here; on a real node its NIC and "
            "the other actors' traffic bound it."
        ),
        "",
        f"| how | s, localhost | s, emulated {rate:g} MB/s + {latency:g} ms | bytes before the first tile |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {ft[m]['localhost']:.2f} | {ft[m]['emulated']:.2f} | {ft[m]['bytes'] / 2**20:.2f} MiB |"
            for m, label in (("range", "range reads"), ("staging", "staging the whole object first"))
        ),
        "",
        "## Read throughput, same slide, same run (one caller thread)",
        "",
        (
            "For a remote slide `read_tiles` fetches the next block's bytes on a helper thread while it decodes the "
            "current block, so CPU-seconds (both threads) can exceed wall seconds. Over localhost the S3 server (read directly, no proxy) and the decoder share the same two cores."
        ),
        "",
        "| source | tiles | tiles/s (wall) | tiles/s per CPU-second |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("s3", "S3 by range (localhost)"), ("local", "local file")):
        r = results["tiles"][name]
        lines.append(f"| {label} | {r['tiles']} | {r['tiles_s']:.0f} | {r['tiles_cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--chunk-tiles",
        type=int,
        nargs="+",
        default=[16, 32, 128, 256],
        help="chunk sizes for the range-read SVS (the staged TIFF uses the first)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-repeat", type=int, default=8, help="CMU repeats per side of the large SVS")
    parser.add_argument("--link-mb-s", type=float, default=100.0, help="emulated per-connection bandwidth, MB/s")
    parser.add_argument("--link-latency-ms", type=float, default=20.0, help="emulated latency per request, ms")
    parser.add_argument("--machine", default="2-core shared x86_64 VM, no GPU, noisy")
    parser.add_argument("--write", default=None, help="write the markdown table here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pathray-bench-s3io-"))
    server = start_server(find_weed(), str(work / "s3"))
    proxy = S3Proxy(upstream=server.endpoint_url.split("://", 1)[1]).start()
    try:
        svs, deflate = make_slides(work)
        server.fs.mkdir(BUCKET)
        uris = {}
        for name, path in (("svs", svs), ("deflate", deflate)):
            uris[name] = f"s3://{BUCKET}/{path.name}"
            server.fs.put_file(str(path), uris[name])
        sizes = {name: os.path.getsize(p) for name, p in (("svs", svs), ("deflate", deflate))}
        results: dict = {"bytes": {}, "floor": read_floor(svs, sizes["svs"])}
        modes = (
            ("SVS, range reads", "svs", "range"),
            ("deflate TIFF, node cache", "deflate", "node cache"),
            ("deflate TIFF, scratch per process (before)", "deflate", "per reader"),
        )
        for label, name, mode in modes:
            for chunk_tiles in args.chunk_tiles if mode == "range" else args.chunk_tiles[:1]:
                r = bytes_per_slide(
                    proxy,
                    server.storage_options,
                    uris[name],
                    f"{BUCKET}/{Path(uris[name]).name}",
                    sizes[name],
                    mode,
                    chunk_tiles,
                    work,
                )
                results["bytes"][(label, chunk_tiles)] = r
                print(label, chunk_tiles, {k: round(v, 3) for k, v in r.items()}, flush=True)
        large = write_large_svs(work / "large.svs", args.large_repeat)
        sizes["large"] = os.path.getsize(large)
        server.fs.put_file(str(large), f"{BUCKET}/large.svs")
        link = (args.link_mb_s * 1e6, args.link_latency_ms / 1e3)
        results["first_tile"] = first_tile(server, proxy, f"s3://{BUCKET}/large.svs", f"{BUCKET}/large.svs", link)
        print(results["first_tile"], flush=True)
        results["tiles"] = tiles_per_s(server, uris["svs"], svs, args.repeats)
        print(results["tiles"], flush=True)
        text = markdown(results, sizes, args)
        print(text)
        if args.write:
            Path(args.write).write_text(text)
    finally:
        proxy.stop()
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
