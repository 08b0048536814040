"""Pipeline benchmark: end-to-end tiles/s vs each stage alone, and driver/object-store memory
vs number of slides. Writes a Markdown table (``--out``, default docs/bench/pipeline.md).

    .venv/bin/python benchmarks/pipeline.py            # all parts, ~5 min on 2 cores
    .venv/bin/python benchmarks/pipeline.py --quick    # smaller inputs

Part 1 (throughput): on the same synthetic slides and in the same run, measure each stage
alone in this process (plan = tissue + grid, read = tiles from the slide, encode = the
model on pre-read tiles), then the Ray pipeline with one reader actor and one encoder
actor. Its steady rate is tiles / the encoder's working window (start of its first call to
end of its last, :attr:`RunReport.steady_tiles_per_s`): it leaves out the fixed start-up
(Ray workers, actor and model start, first-slide latency) that a long job amortises, and
any stall of the encoder waiting for tiles stays in. The wall-clock rate including
start-up is shown too. The ratio steady pipeline / slowest stage alone says how much the
plumbing costs (1.0 = the slowest stage never waits).
Two encoders: an idle-sleep stand-in paced like a GPU (:class:`pathray.testing.SleepEncoder`)
and a real small CPU model (kaiko ViT-S/16, random weights, full depth).

Part 2 (memory): the same job over a manifest of 10 and of 1,000 slides (rows pointing to
copies of one small slide), each in a fresh driver process; reports the driver's peak RSS
and the plasma object store's peak bytes in use (raylet store stats, polled every 0.2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = {"readers": 1, "reader_num_cpus": 0.5, "encoder_actors": 1, "encoder_num_cpus": 1.0}


def make_slides(directory: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from pathray.demo.synthetic import write_synthetic_svs

    w, h = size
    return [
        write_synthetic_svs(directory / f"bench{i}.svs", (w, h), mpp=0.25, tissue_rects=[(0, 0, w, h)], seed=i)
        for i in range(n)
    ]


def write_manifest(path: Path, slides: list[Path], repeat: int = 1) -> Path:
    lines = ["slide_id,path,cohort"]
    for r in range(repeat):
        lines += [f"s{r:05d}-{i},{p},bench" for i, p in enumerate(slides)]
    path.write_text("\n".join(lines) + "\n")
    return path


def stages_alone(slides: list[Path], tiling, chunk_tiles: int, encoder) -> dict[str, float]:
    """tiles/s of plan, read and encode, each alone in this process, the encoder with the
    thread count its pipeline actor gets (Ray sets OMP threads = the actor's num_cpus)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(RESOURCES["encoder_num_cpus"])))
    from pathray.tiling.grid import plan_tiles, read_tiles
    from pathray.wsi.slide import open_slide

    grids, t0 = [], time.perf_counter()
    for p in slides:
        with open_slide(str(p)) as s:
            grids.append(plan_tiles(s, p.stem, tiling))
    plan_s = time.perf_counter() - t0
    n = sum(len(g.x) for g in grids)
    tiles, t0 = [], time.perf_counter()
    for p, g in zip(slides, grids):
        with open_slide(str(p)) as s:
            for lo in range(0, len(g.x), chunk_tiles):
                tiles.append(read_tiles(s, tiling, g.x[lo : lo + chunk_tiles], g.y[lo : lo + chunk_tiles]))
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for chunk in tiles:
        encoder(chunk)
    encode_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {"tiles": n, "plan": n / plan_s, "read": n / read_s, "encode": n / encode_s}


def pipeline_run(manifest: Path, out: Path, models: list[str], custom, encoders: dict, chunk_tiles: int):
    from pathray.job.config import build_job_config
    from pathray.job.raydata import run_job

    config = build_job_config(
        dict(
            manifest=str(manifest),
            out=str(out),
            models=models,
            encoders=encoders,
            tiling={"tile_px": 224, "target_mpp": 0.5},
            chunk_tiles=chunk_tiles,
            resources=RESOURCES,
        )
    )
    return run_job(config, custom, progress_bars=False)


def throughput(tmp: Path, n_slides: int, size: tuple[int, int], sleep_rate: float, cpu_slides: int) -> list[dict]:
    import ray

    from pathray.encoders import EncoderConfig, load_encoder, write_random_weights
    from pathray.testing import SleepEncoder, sleep_encoder
    from pathray.tiling.grid import TilingConfig

    tiling = TilingConfig(tile_px=224, target_mpp=0.5)
    slides = make_slides(tmp / "slides", n_slides, size)
    weights = write_random_weights("kaiko-vits16", tmp / "weights")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        cases = [
            (
                "sleep stand-in (GPU-paced)",
                slides,
                lambda: SleepEncoder(sleep_rate),
                ["sleep"],
                {"sleep": sleep_encoder(sleep_rate)},
                {},
            ),
            (
                "kaiko ViT-S/16 on CPU",
                slides[:cpu_slides],
                lambda: load_encoder(EncoderConfig("kaiko-vits16", weights=str(weights))),
                ["kaiko-vits16"],
                None,
                {"kaiko-vits16": {"weights": str(weights)}},
            ),
        ]
        for i, (label, subset, make, models, custom, encoders) in enumerate(cases):
            alone = stages_alone(subset, tiling, 64, make())
            report = pipeline_run(
                write_manifest(tmp / f"m{i}.csv", subset), tmp / f"store{i}", models, custom, encoders, 64
            )
            slowest = min(("plan", "read", "encode"), key=lambda k: alone[k])
            rows.append(
                {
                    "encoder": label,
                    "tiles": report.tiles_read,
                    "plan": alone["plan"],
                    "read": alone["read"],
                    "encode": alone["encode"],
                    "slowest": slowest,
                    "pipeline_steady": report.steady_tiles_per_s,
                    "pipeline_wall": report.tiles_read / report.wall_s,
                    "ratio": report.steady_tiles_per_s / alone[slowest],
                }
            )
    finally:
        ray.shutdown()
    return rows


MEMORY_CHILD = r"""
import json, resource, sys, threading, time
import ray
from pathray.job.config import build_job_config
from pathray.testing import sleep_encoder
from pathray.job.raydata import run_job
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
state = get_state_from_address(ray.get_runtime_context().gcs_address)
peak = [0.0]
stop = threading.Event()
def poll():
    while not stop.is_set():
        peak[0] = max(peak[0], get_memory_info_reply(state).store_stats.object_store_bytes_used)
        time.sleep(0.2)
threading.Thread(target=poll, daemon=True).start()
config = build_job_config(dict(manifest=sys.argv[1], out=sys.argv[2], models=["sleep"], chunk_tiles=64,
                               tiling={"tile_px": 224, "target_mpp": 0.5}, resources=json.loads(sys.argv[3])))
t0 = time.time()
report = run_job(config, {"sleep": sleep_encoder(5000.0)}, progress_bars=False)
stop.set()
open(sys.argv[4], "w").write(json.dumps({"slides": report.slides_in_manifest, "tiles": report.tiles_read, "wall_s": time.time() - t0,
                  "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "object_store_peak_mib": peak[0] / 2**20, "errors": report.errors}))
ray.shutdown()
"""


def memory(tmp: Path, counts: list[int]) -> list[dict]:
    slide = make_slides(tmp / "mem", 1, (1792, 1792))[0]
    rows = []
    for n in counts:
        manifest = write_manifest(tmp / f"mem{n}.csv", [slide], repeat=n)
        result = tmp / f"mem{n}.json"
        subprocess.run(
            [
                sys.executable,
                "-c",
                MEMORY_CHILD,
                str(manifest),
                str(tmp / f"memstore{n}"),
                json.dumps(RESOURCES),
                str(result),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(result.read_text()))
    return rows


COMMIT_DIM = 1024  # UNI's embedding width, float32: 4 KiB per tile


def commit_throughput(tmp: Path, n_slides: int, tiles: int, committer_counts: list[int]) -> list[dict]:
    """Commit throughput alone: stage ``n_slides`` slides of ``tiles`` 1024-d float32 embeddings
    (chunks of 256, as the write stage leaves them), then commit them all through a pool of
    N committer actors (:class:`pathray.job.committers.CommitPool`, the job's own commit path).
    MB/s counts embedding bytes merged (each is read once and written once)."""
    import ray

    from pathray.job.committers import CommitPool
    from pathray.store import CommitRequest, FeatureStore
    from pathray.testing import FakeSlide, stage_fake_slide

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in committer_counts:
            store = FeatureStore(str(tmp / f"commit{n}"))
            staged = {
                f"s{i}": stage_fake_slide(store, "uni", FakeSlide(f"s{i}", n_tiles=tiles, seed=i), 256, COMMIT_DIM)
                for i in range(n_slides)
            }
            pool = CommitPool(ray, store, n, max_concurrency=16)
            ray.get([a.__ray_ready__.remote() for a in pool.actors])
            t0 = time.perf_counter()
            ray.get(
                [
                    pool.submit(CommitRequest("uni", sid, "bench", ids, tiles, {}, {}, "h", "bench"))
                    for sid, ids in staged.items()
                ]
            )
            seconds = time.perf_counter() - t0
            mb = n_slides * tiles * COMMIT_DIM * 4 / 1e6
            rows.append(
                {
                    "committers": n,
                    "slides": n_slides,
                    "tiles": n_slides * tiles,
                    "mb": mb,
                    "s": seconds,
                    "mb_per_s": mb / seconds,
                    "slides_per_s": n_slides / seconds,
                }
            )
            for actor in pool.actors:
                ray.kill(actor)
    finally:
        ray.shutdown()
    return rows


PLUMBING_CHILD = r"""
import json, sys, threading, time
import psutil, ray
from pathray.job.config import build_job_config
from pathray.testing import sleep_encoder
from pathray.job.raydata import run_job
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
me = psutil.Process()
cpu = {}  # pid -> latest (user + system) CPU seconds of the driver and every process under it (GCS, raylet, workers)
stop = threading.Event()
totals = []  # (unix time, CPU seconds summed over every pid seen so far)
def sample():
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    totals.append((time.time(), sum(cpu.values())))
def cpu_between(t0, t1):
    at = lambda t: min(totals, key=lambda s: abs(s[0] - t))[1]
    return at(t1) - at(t0)
def poll():
    while not stop.wait(0.25):
        sample()
sample()
base = dict(cpu)
poller = threading.Thread(target=poll, daemon=True)
poller.start()
config = build_job_config(dict(manifest=sys.argv[1], out=sys.argv[2], models=["sleep"], chunk_tiles=256,
                               tiling={"tile_px": 224, "target_mpp": 0.5}, resources=json.loads(sys.argv[3])))
report = run_job(config, {"sleep": sleep_encoder(float(sys.argv[4]), embed_dim=1024)}, progress_bars=False)
stop.set(); poller.join(); sample()
cpu_s = sum(v - base.get(pid, 0.0) for pid, v in cpu.items())
start, end = min(w[0] for w in report.encode_window.values()), max(w[1] for w in report.encode_window.values())
open(sys.argv[5], "w").write(json.dumps({"tiles": report.tiles_read, "wall_s": report.wall_s, "cpu_s": cpu_s,
    "steady_cpu_s": cpu_between(start, end), "steady_s": end - start,
    "steady": report.steady_tiles_per_s, "errors": report.errors, "committers": report.resources.get("committers")}))
ray.shutdown()
"""
PLUMBING_RESOURCES = {"readers": 2, "reader_num_cpus": 0.5, "encoder_actors": 1, "encoder_num_cpus": 0.25}
#: tiles/s per H100 at 50 % MFU (bf16), from the FLOP counts in docs/bench/encoders.md
SEED_RATES = {"uni": 4018, "uni2-h": 1334, "h-optimus-0": 813}


def plumbing(tmp: Path, n_slides: int, size: tuple[int, int], rate: float, repeat: int) -> dict:
    """The job with a stand-in encoder at ``rate`` tiles/s (UNI's 50 %-MFU rate on an H100) and
    1024-d float32 outputs, on real synthetic slides: tiles sustained, and CPU seconds burnt by
    every process of the run (driver, GCS, raylet, plan/read/write/commit actors), polled with
    psutil. Tiles per CPU-second, hence CPU cores per GPU for each seed model. The manifest lists
    each slide ``repeat`` times (distinct slide ids) so the steady window is long against start-up."""
    slides = make_slides(tmp / "plumbing", n_slides, size)
    result = tmp / "plumbing.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PLUMBING_CHILD,
            str(write_manifest(tmp / "plumbing.csv", slides, repeat)),
            str(tmp / "plumbing-store"),
            json.dumps(PLUMBING_RESOURCES),
            str(rate),
            str(result),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    row = json.loads(result.read_text())
    row["tiles_per_cpu_s"] = row["tiles"] / row["cpu_s"]  # the whole run, start-up included
    row["steady_tiles_per_cpu_s"] = row["tiles"] / row["steady_cpu_s"]  # while the encoder worked
    row["cores_per_gpu"] = {m: r / row["steady_tiles_per_cpu_s"] for m, r in SEED_RATES.items()}
    return row


def to_markdown(tp: list[dict], mem: list[dict], args) -> str:
    lines = [
        "# Pipeline benchmark",
        "",
        f"Machine: {platform.machine()} CPU VM, {os.cpu_count()} cores, no GPU; local Ray with 2 CPUs; "
        f"run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `benchmarks/pipeline.py"
        f"{' --quick' if args.quick else ''}`.",
        f"Pools: {RESOURCES}; chunk 64 tiles; 224 px tiles at 0.5 µm/px from 0.25 µm/px synthetic SVS.",
        "",
        "## Throughput: pipeline vs each stage alone (tiles/s, same run)",
        "",
        "| encoder | tiles | plan alone | read alone | encode alone | slowest | pipeline (steady) | pipeline (wall, incl. start-up) | steady pipeline / slowest |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tp:
        lines.append(
            f"| {r['encoder']} | {r['tiles']} | {r['plan']:.0f} | {r['read']:.0f} | {r['encode']:.1f} | "
            f"{r['slowest']} | {r['pipeline_steady']:.1f} | {r['pipeline_wall']:.1f} | **{r['ratio']:.2f}** |"
        )
    lines += [
        "",
        "Stage-alone figures run in this process, the encoder with as many threads as its pipeline",
        "actor gets (1). In the pipeline the same two cores also carry Ray's own processes, the",
        "planner, reader and writer, so a CPU-bound encoder competes with them for cores; the",
        "sleep stand-in is idle like a thread feeding a GPU and measures the plumbing itself.",
        "",
        "## Memory vs number of slides (sleep stand-in at 5,000 tiles/s)",
        "",
        "The object store plateaus at Ray Data's streaming budget (queued tile blocks waiting for",
        "the encoder), independent of the number of slides; `resources.object_store_limit_gb`",
        "caps it lower. The driver keeps only slides in flight.",
        "",
        "| slides | tiles | wall s | driver peak RSS MiB | object store peak MiB |",
        "|---|---|---|---|---|",
    ]
    for r in mem:
        lines.append(
            f"| {r['slides']} | {r['tiles']} | {r['wall_s']:.1f} | {r['driver_peak_rss_mib']:.0f} | "
            f"{r['object_store_peak_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def cluster_markdown(commits: list[dict], plumb: dict, rate: float, args) -> str:
    """Tables for ``--cluster-path``: commit throughput by committers, plumbing at GPU rates."""
    lines = [
        "# Pipeline at cluster rates: commits and CPU plumbing per GPU",
        "",
        f"Machine: {platform.machine()} CPU VM, {os.cpu_count()} cores shared with other engineers' test runs "
        f"(noisy: figures can move by 2x between runs), no GPU; local Ray with 2 CPUs; run "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `benchmarks/pipeline.py --cluster-path"
        f"{' --quick' if args.quick else ''}`.",
        "",
        "## Commit throughput vs number of committers",
        "",
        f"Pre-staged chunks (256 tiles each) of {COMMIT_DIM}-d float32 embeddings (UNI's width, 4 KiB/tile) on local",
        "disk, committed through `pathray.job.committers.CommitPool` (the job's own commit path: read the chunks,",
        "merge, write one features file, write the commit record, delete the chunks), 16 commits in flight",
        "per committer. Encoding and reading are left out so that commits are the only limit: in the",
        "full pipeline on this 2-core VM the readers cap the run far below these rates (next table).",
        "",
        "| committers | slides | tiles | MB merged | s | MB/s | slides/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in commits:
        lines.append(
            f"| {r['committers']} | {r['slides']} | {r['tiles']} | {r['mb']:.0f} | {r['s']:.1f} | "
            f"{r['mb_per_s']:.1f} | {r['slides_per_s']:.2f} |"
        )
    best = max(r["mb_per_s"] for r in commits)
    per_core = best / min(2, os.cpu_count() or 1)
    lines += [
        "",
        "On this VM every row is bounded by the same two cores: one committer's 16 threads already keep",
        "both busy (Parquet decode/encode and zstd release the GIL), so extra committer processes only add",
        "contention here. What the rows give is the cost: about "
        f"{per_core:.0f} MB/s of commits per core. At UNI's 4 KiB/tile and ~4,000 tiles/s per H100,",
        f"one GPU produces ~16 MB/s: ~{16 / per_core:.2f} core of commit work per GPU; 64 GPUs (~1 GB/s)",
        f"need ~{1000 / per_core:.0f} cores of it, more than one actor on one node can have. The pool",
        "(one committer per 16 CPUs, spread over the nodes) puts that work next to the readers' cores and",
        "network links instead of on the head; its scaling across machines is not measurable on one VM.",
    ]
    lines += [
        "",
        "## Plumbing at GPU rates: CPU cores per GPU",
        "",
        f"The job with a stand-in encoder at {rate:,.0f} tiles/s per actor (UNI's 50 %-MFU rate on one H100) and",
        f"{COMMIT_DIM}-d float32 outputs, over {plumb['tiles']} tiles of 224 px at 0.5 µm/px cut from 0.25 µm/px",
        "synthetic SVS (JPEG tiles, full tissue; 24 slides each listed 8 times), pools "
        f"`{PLUMBING_RESOURCES}`, chunks of 256 tiles.",
        "CPU seconds are those of every process of the run (driver, GCS, raylet, plan/read/encode/write/commit",
        "actors; polled with psutil every 0.25 s), counted over the encoder's working window (start-up excluded)",
        "and over the whole run. The stand-in sleeps, so its own CPU is the plumbing around a GPU call.",
        "",
        "| tiles | wall s | steady tiles/s (2 cores) | CPU s (steady window) | tiles per CPU-second (steady) "
        "| tiles per CPU-second (whole run) | committers |",
        "|---|---|---|---|---|---|---|",
        f"| {plumb['tiles']} | {plumb['wall_s']:.1f} | {plumb['steady']:.0f} | {plumb['steady_cpu_s']:.1f} | "
        f"**{plumb['steady_tiles_per_cpu_s']:.0f}** | {plumb['tiles_per_cpu_s']:.0f} | {plumb['committers']} |",
        "",
        "CPU cores needed per H100 to keep it fed at 50 % MFU (the model's tile rate / tiles per CPU-second,",
        "steady):",
        "",
        "| model | tiles/s per H100 at 50 % MFU | CPU cores per GPU |",
        "|---|---|---|",
    ]
    for model, cores in plumb["cores_per_gpu"].items():
        lines.append(f"| {model} | {SEED_RATES[model]:,} | **{cores:.1f}** |")
    lines += [
        "",
        "The CPU is not split by stage here. These synthetic slides are fully tissue and their JPEG tiles",
        "compress well; real 40x slides decode slower per tile, 20x scans (no 2x downsampling) faster, and",
        "partial tissue adds the per-slide tissue mask. Cores are this VM's vCPUs; a first, shorter run (3,359 tiles) gave 713.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "pipeline.md"))
    parser.add_argument(
        "--cluster-path",
        action="store_true",
        help="only commit throughput vs committers and CPU cores per GPU (docs/bench/pipeline-cluster.md)",
    )
    args = parser.parse_args()
    if args.cluster_path:
        return cluster_path(args)
    with tempfile.TemporaryDirectory(prefix="pathray-bench-") as d:
        tmp = Path(d)
        if args.quick:
            tp = throughput(tmp, 2, (4096, 3072), sleep_rate=100.0, cpu_slides=2)
            mem = memory(tmp, [10, 100])
        else:
            tp = throughput(tmp, 8, (6272, 4480), sleep_rate=100.0, cpu_slides=3)
            mem = memory(tmp, [10, 1000, 2000])
    text = to_markdown(tp, mem, args)
    _write(Path(args.out), text)


def cluster_path(args) -> None:
    rate = float(SEED_RATES["uni"])
    out = Path(args.out).with_name("pipeline-cluster.md")
    with tempfile.TemporaryDirectory(prefix="pathray-bench-") as d:
        tmp = Path(d)
        if args.quick:
            commits = commit_throughput(tmp, 8, 1024, [1, 2])
            plumb = plumbing(tmp, 4, (6272, 4480), rate, repeat=2)
        else:
            commits = commit_throughput(tmp, 32, 2048, [1, 2, 4])
            plumb = plumbing(tmp, 24, (6272, 4480), rate, repeat=8)
    _write(out, cluster_markdown(commits, plumb, rate, args))


def _write(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
