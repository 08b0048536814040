"""Scale rehearsal: a TCGA-shaped cohort of 1k-30k slides through the job's real path, and the
re-run on the fully committed store. Writes a Markdown table (``--out``, default docs/bench/scale.md).

    .venv/bin/python benchmarks/scale.py                       # 1k, 3k, 10k slides
    .venv/bin/python benchmarks/scale.py --points 1000,3000,10000,30000

Every slide is a hard link of one tiny synthetic SVS (4 tiles of 224 px at 0.5 µm/px) under a
TCGA-style name (``TCGA-XX-XXXX-01Z-00-DX1``, cohorts ``tcga_brca`` ..., a ``case_id`` column
kept on every tile row), so the cost per slide is the framework's: plan, read, write, commit,
ledger, status table. The encoder is :func:`pathray.testing.sleep_encoder` paced at a GPU's
4,000 tiles/s. Each run is a fresh driver process (``runner: local``, store on local disk);
its RSS is sampled every 0.1 s. Per point: the first run (wall time, committed slides/s, the
time of each driver phase), the store it leaves (files, status table and ledger sizes), and a
re-run of the same manifest on that committed store (time until it reports nothing to do,
files it adds). Growth exponents are least-squares slopes of log(time or RSS) vs log(slides).

Bars (printed, and in the table): every phase's time grows at most linearly (exponent <= 1.1);
driver RSS <= 2 GiB at the largest point; committed throughput at the largest point >= 0.8x the
smallest point's. Phase exponents are fitted only over phases taking >= 0.5 s at the largest point
(sub-second phases are noise on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COHORTS = ("tcga_brca", "tcga_luad", "tcga_coad", "tcga_prad", "tcga_kirc")
TILES_PER_S = 4000.0
#: driver phases timed by wrapping the job's own functions (module attribute -> phase name)
PHASES = {
    "pathray.job.raydata.read_reachable": "manifest",
    "pathray.job.raydata._todo": "resume",
    "pathray.job.raydata.run_local": "embed+commit",
    "pathray.job.raydata.consolidate_slide_table": "status table",
    "pathray.monitor.page.write_embed_page": "report page",
}
EXPONENT_MAX, RSS_MAX_GIB, THROUGHPUT_MIN, PHASE_MIN_S = 1.1, 2.0, 0.8, 0.5


def slide_id(i: int) -> str:
    """A TCGA-shaped slide barcode, unique per ``i``."""
    return f"TCGA-{'ABCDEFGHJK'[i % 10]}{i // 10 % 10}-{i // 100:04d}-01Z-00-DX1"


def make_cohort(directory: Path, n: int) -> Path:
    """``n`` hard links of one tiny synthetic slide and their TCGA-shaped manifest; returns it."""
    from pathray.demo.synthetic import write_synthetic_svs

    directory.mkdir(parents=True, exist_ok=True)
    source = write_synthetic_svs(
        directory / "source.svs", (1024, 1024), mpp=0.25, tissue_rects=[(0, 0, 1024, 1024)], downsamples=(1, 4)
    )
    lines = ["slide_id,path,cohort,case_id"]
    for i in range(n):
        sid = slide_id(i)
        path = directory / f"{sid}.svs"
        if not path.exists():
            os.link(source, path)
        lines.append(f"{sid},{path},{COHORTS[i % len(COHORTS)]},{sid[:12]}")
    manifest = directory / f"manifest-{n}.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def job_config(manifest: str, out: str):
    from pathray.job.config import build_job_config

    return build_job_config(
        dict(
            manifest=manifest,
            out=out,
            models=["sleep"],
            runner="local",
            chunk_tiles=64,
            keep_columns=["case_id"],
            tiling={"tile_px": 224, "target_mpp": 0.5},
        )
    )


def _wrap_phases(timings: dict[str, float]) -> None:
    """Replace each :data:`PHASES` function by one adding its seconds to ``timings``."""
    import importlib

    for dotted, phase in PHASES.items():
        module_name, attr = dotted.rsplit(".", 1)
        module = importlib.import_module(module_name)
        inner = getattr(module, attr)

        def timed(*args, _inner=inner, _phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                timings[_phase] = timings.get(_phase, 0.0) + time.perf_counter() - t0

        setattr(module, attr, timed)


def child(manifest: str, out: str, result: str) -> None:
    """One driver: run the job, sampling this process's RSS; write the figures to ``result``."""
    import psutil
    import torch

    torch.set_num_threads(1)
    from pathray.job.raydata import run_job
    from pathray.testing import sleep_encoder

    proc, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    timings: dict[str, float] = {}
    _wrap_phases(timings)
    t0 = time.perf_counter()
    report = run_job(job_config(manifest, out), {"sleep": sleep_encoder(TILES_PER_S)}, progress_bars=False)
    wall = time.perf_counter() - t0
    stop.set()
    Path(result).write_text(
        json.dumps(
            {
                "wall_s": wall,
                "rss_peak_mib": max(peak[0], proc.memory_info().rss) / 2**20,
                "phases_s": timings,
                "committed": report.per_model["sleep"]["ok"],
                "skipped": report.slides_skipped,
                "errors": report.errors,
                "tiles": report.tiles_read,
            }
        )
    )


def run_driver(manifest: Path, out: Path | str, result: Path, env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(manifest), str(out), str(result)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"driver failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def store_files(out: Path) -> dict[str, tuple[int, int]]:
    """(files, bytes) per top-level folder of a local store."""
    found: dict[str, tuple[int, int]] = {}
    for directory, _, names in os.walk(out):
        top = Path(directory).relative_to(out).parts[:1] or (".",)
        n, b = found.get(top[0], (0, 0))
        found[top[0]] = (n + len(names), b + sum(os.path.getsize(os.path.join(directory, x)) for x in names))
    return found


def file_set(out: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, x), out) for d, _, names in os.walk(out) for x in names}


def point(tmp: Path, n: int) -> dict:
    import pyarrow.parquet as pq

    manifest = make_cohort(tmp / "slides", n)
    out = tmp / f"store{n}"
    first = run_driver(manifest, out, tmp / f"first{n}.json")
    before, files = file_set(out), store_files(out)
    rerun = run_driver(manifest, out, tmp / f"rerun{n}.json")
    added = sorted(file_set(out) - before)
    status = pq.read_metadata(out / "slides.parquet")
    return {
        "slides": n,
        "first": first,
        "rerun": rerun,
        "files": files,
        "rerun_added": added,
        "status_rows": status.num_rows,
        "status_mib": (out / "slides.parquet").stat().st_size / 2**20,
        "ledger": files.get("_runs", (0, 0)),
    }


def s3_point(tmp: Path, n: int) -> dict:
    """The same first run and re-run with the store on SeaweedFS S3 (slides on local disk), every
    request counted by kind at a proxy; then the re-run again without the commit index (the
    store as it was before the index existed: one GET per commit record)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.s3 import _stop, find_weed, start_server
    from fixtures.s3proxy import S3Proxy

    manifest = make_cohort(tmp / "slides", n)
    server = start_server(find_weed(), str(tmp / f"s3-{n}"))
    proxy = S3Proxy(upstream=server.endpoint_url.split("://", 1)[1]).start()
    env = {**server.env, "AWS_ENDPOINT_URL": proxy.endpoint_url}
    try:
        server.fs.mkdir("bench")
        out, runs = f"s3://bench/store{n}", {}
        for name in ("first", "rerun", "rerun without index"):
            index = f"bench/store{n}/_commits/index/model=sleep.parquet"
            if name == "rerun without index" and server.fs.exists(index):
                server.fs.rm(index)
            proxy.reset()
            runs[name] = run_driver(manifest, out, tmp / f"s3-{name}-{n}.json", env)
            runs[name]["requests"] = dict(proxy.kinds)
        return {"slides": n, **runs}
    finally:
        proxy.stop()
        _stop(server.process)


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) vs log(x)."""
    return float(np.polyfit(np.log(xs), np.log(np.maximum(ys, 1e-3)), 1)[0]) if len(xs) > 1 else float("nan")


def bars(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """(goal, met, measured) for each bar of the issue."""
    n = [r["slides"] for r in rows]
    series = {"wall": [r["first"]["wall_s"] for r in rows], "re-run": [r["rerun"]["wall_s"] for r in rows]}
    for phase in PHASES.values():
        values = [r["first"]["phases_s"].get(phase, 0.0) for r in rows]
        if values[-1] >= PHASE_MIN_S:
            series[phase] = values
    for phase in PHASES.values():
        values = [r["rerun"]["phases_s"].get(phase, 0.0) for r in rows]
        if values[-1] >= PHASE_MIN_S:
            series[f"re-run {phase}"] = values
    out = [
        (f"time exponent of {k} <= {EXPONENT_MAX}", (e := exponent(n, v)) <= EXPONENT_MAX, f"{e:.2f}")
        for k, v in series.items()
    ]
    rss = max(r["first"]["rss_peak_mib"] for r in rows[-1:]) / 1024
    out.append((f"driver RSS <= {RSS_MAX_GIB:g} GiB at {n[-1]:,} slides", rss <= RSS_MAX_GIB, f"{rss:.2f} GiB"))
    rate = [r["first"]["committed"] / r["first"]["wall_s"] for r in rows]
    out.append(
        (
            f"committed slides/s at {n[-1]:,} >= {THROUGHPUT_MIN}x the {n[0]:,} point",
            rate[-1] >= THROUGHPUT_MIN * rate[0],
            f"{rate[-1] / rate[0]:.2f}x",
        )
    )
    e = exponent(n, [r["first"]["rss_peak_mib"] for r in rows])
    out.append(("driver RSS exponent (reported; flat is ~0)", True, f"{e:.2f}"))
    return out


def render(rows: list[dict], goals: list[tuple[str, bool, str]], extra: str) -> str:
    lines = [
        "# Scale rehearsal (TCGA-shaped cohort, local runner, local disk)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores shared with other "
        "work, by `benchmarks/scale.py`: each slide a hard link of one tiny synthetic SVS (4 tiles), TCGA-style ids, "
        f"5 cohorts, `case_id` kept; stand-in encoder paced at {TILES_PER_S:,.0f} tiles/s; each run a fresh driver.",
        "",
        "| slides | wall s | committed slides/s | driver RSS peak MiB | manifest s | resume s | embed+commit s "
        "| status table s | report page s | store files | status rows (MiB) | ledger parts (MiB) | re-run s "
        "| re-run RSS MiB | re-run new files |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, p = r["first"], r["first"]["phases_s"]
        files = sum(n for n, _ in r["files"].values())
        lines.append(
            f"| {r['slides']:,} | {f['wall_s']:.1f} | {f['committed'] / f['wall_s']:.1f} | {f['rss_peak_mib']:.0f} | "
            + " | ".join(f"{p.get(k, 0.0):.2f}" for k in PHASES.values())
            + f" | {files:,} | {r['status_rows']:,} ({r['status_mib']:.2f}) | {r['ledger'][0]} ({r['ledger'][1] / 2**20:.2f}) "
            f"| {r['rerun']['wall_s']:.1f} | {r['rerun']['rss_peak_mib']:.0f} | {len(r['rerun_added'])} |"
        )
    lines += ["", "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {g} | {'yes' if ok else '**no**'} | {m} |" for g, ok, m in goals]
    rerun_phases = "; ".join(
        f"{r['slides']:,}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["rerun"]["phases_s"].items()) for r in rows
    )
    lines += [
        "",
        f"Re-run phases (s): {rerun_phases}.",
        "",
        "Files a re-run adds: " + ", ".join(sorted({Path(a).name for r in rows for a in r["rerun_added"]})) + ".",
        extra,
    ]
    return "\n".join(lines) + "\n"


def render_s3(rows: list[dict]) -> str:
    """The S3 runs: wall time and requests by kind of the first run and both re-runs."""
    lines = [
        "",
        "## Store on SeaweedFS S3 (slides on local disk)",
        "",
        "Requests counted by kind at a proxy in front of SeaweedFS (`weed mini`, 127.0.0.1). "
        '"Re-run without index" is the re-run with the commit index deleted: what every re-run did '
        "before the index (one GET per commit record).",
        "",
        "| slides | run | wall s | committed slides/s | driver RSS MiB | GET | LIST | HEAD | PUT | POST | DELETE |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for name in ("first", "rerun", "rerun without index"):
            f, q = r[name], r[name]["requests"]
            rate = f"{f['committed'] / f['wall_s']:.1f}" if f["committed"] else "-"
            lines.append(
                f"| {r['slides']:,} | {name} | {f['wall_s']:.1f} | {rate} | {f['rss_peak_mib']:.0f} | "
                + " | ".join(str(q.get(k, 0)) for k in ("GET", "LIST", "HEAD", "PUT", "POST", "DELETE"))
                + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="1000,3000,10000", help="comma-separated slide counts")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "scale.md"))
    parser.add_argument("--s3-points", default="1000", help="slide counts run with the store on S3 ('' for none)")
    parser.add_argument("--note", default="", help="a paragraph appended to the table (e.g. the dry-run figure)")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pathray-scale-") as tmp:
        for n in (int(x) for x in args.points.split(",")):
            rows.append(point(Path(tmp), n))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "rerun_added"}), flush=True)
        s3_rows = [s3_point(Path(tmp), int(x)) for x in args.s3_points.split(",") if x]
        for r in s3_rows:
            print(json.dumps(r), flush=True)
    goals = bars(rows)
    for goal, ok, measured in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {goal}: {measured}")
    if args.json:
        Path(args.json).write_text(json.dumps({"local": rows, "s3": s3_rows}, indent=1))
    Path(args.out).write_text(render(rows, goals, args.note) + (render_s3(s3_rows) if s3_rows else ""))


if __name__ == "__main__":
    main()
