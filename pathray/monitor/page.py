"""What the embed and aggregate runs put on their ``report.html`` (:mod:`pathray.monitor.html`).

QC gallery cost: the driver re-plans at most :data:`QC_GALLERY_SLIDES` of the run's ok
slides at the end (open, tissue thumbnail, tile grid: the planner's own steps, no pixels
of tiles read), then draws :func:`pathray.tiling.qc.qc_image`. About 0.1-0.5 s per local slide;
an ``s3://`` slide read by byte range fetches its header and thumbnail level only (other
formats are staged whole, so keep this small). Re-planning in the driver keeps the stages
and their Ray actors unchanged and costs a bounded, small amount at the end of any run.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pathray.monitor.html import RunPage, png_bytes, run_status_rows, write_run_html

if TYPE_CHECKING:
    from pathray.job.drive import RunContext

log = logging.getLogger("pathray")

#: slides re-planned at the end of a run for the QC gallery
QC_GALLERY_SLIDES = 12
THUMB_PX = 256


def write_embed_page(run: RunContext) -> str:
    """The embed run's page; returns its URI."""
    report = run.report
    rows, total = run_status_rows(run.store, run.run_id)
    tiles_written = sum(c["tiles"] for c in report.per_model.values())
    summary = [
        ("Run", report.run_id),
        ("Store", report.store),
        ("Runner", report.runner or "nothing to do"),
        ("Models", ", ".join(run.model_names)),
        (
            "Slides",
            f"{report.slides_in_manifest} in manifest, {report.slides_skipped} already done, "
            f"{report.pairs_to_do} (slide, model) pairs to do",
        ),
        ("Tiles", f"{report.tiles_planned} planned, {report.tiles_read} read, {tiles_written} written"),
        ("Wall time", f"{report.wall_s:.1f} s"),
        (
            "Throughput",
            f"{report.tiles_read / report.wall_s:.1f} tiles/s overall, "
            f"{report.steady_tiles_per_s:.1f} tiles/s while encoding"
            if report.wall_s > 0
            else "-",
        ),
        ("Errors", str(report.errors)),
    ]
    summary += [(f"Model {m}", ", ".join(f"{k} {v}" for k, v in c.items())) for m, c in report.per_model.items()]
    if report.aborted:
        summary.append(("Aborted", report.aborted))
    stages = {"read": lambda s: s.get("read", 0)}
    stages.update({f"write:{m}": (lambda s, m=m: s["written"].get(m, 0)) for m in run.model_names})
    start = time.perf_counter()
    gallery = qc_gallery(run, rows)
    log.info("QC gallery: %d slides re-planned in %.1f s", len(gallery), time.perf_counter() - start)
    page = RunPage(f"pathray embed {report.run_id}", summary, report.timeline, stages, rows, total, gallery)
    return write_run_html(run.store, run.run_id, page)


def qc_gallery(run: RunContext, rows: list[dict[str, Any]]) -> list[tuple[str, bytes, bytes]]:
    """(slide id, thumbnail PNG, full QC PNG) for up to :data:`QC_GALLERY_SLIDES` ok slides."""
    from pathray.tiling.grid import plan_tiles
    from pathray.tiling.qc import qc_image
    from pathray.wsi.slide import open_slide

    groups = run.config.tiling_groups(run.model_names)
    seen: set[str] = set()
    gallery = []
    for r in rows:
        if r["status"] != "ok" or r["slide_id"] in seen or len(seen) >= QC_GALLERY_SLIDES:
            continue
        seen.add(r["slide_id"])
        entry = run.entries[r["slide_id"]]
        tiling = next(g.tiling for g in groups if g.takes(r["model"]))
        try:
            with open_slide(entry.path, mpp_override=entry.mpp, storage_options=run.config.slide_options) as handle:
                image = qc_image(plan_tiles(handle, r["slide_id"], tiling))
        except Exception as exc:  # noqa: BLE001 - the page shows what it can; the run's outcome stands
            log.info("QC gallery: %s skipped (%s)", r["slide_id"], exc)
            continue
        gallery.append((r["slide_id"], png_bytes(image, THUMB_PX), png_bytes(image)))
    return gallery


def write_aggregate_page(store: Any, report: Any, rows: list[dict[str, Any]], series: list[dict[str, Any]]) -> str:
    """The aggregate run's page (no QC gallery: it tiles nothing); returns its URI."""
    wall_s = report.ended_at - report.started_at
    summary = [
        ("Run", report.run_id),
        ("Store", report.store),
        ("Runner", report.runner or "nothing to do"),
        ("Tile model", report.model),
        ("Aggregator", report.aggregator),
        (
            "Slides",
            f"{report.slides_committed} committed, {report.slides_skipped} already aggregated; "
            + ", ".join(f"{k} {v}" for k, v in report.counts.items()),
        ),
        ("Tiles", str(report.tiles)),
        ("Wall time", f"{wall_s:.1f} s"),
        ("Throughput", f"{report.tiles / wall_s:.1f} tiles/s" if wall_s > 0 else "-"),
    ]
    if report.aborted:
        summary.append(("Aborted", report.aborted))
    model = report.aggregator
    stages = {"load": lambda s: s.get("load", 0), f"aggregate:{model}": lambda s: s["written"].get(model, 0)}
    page = RunPage(f"pathray aggregate {report.run_id}", summary, series, stages, rows, len(rows))
    return write_run_html(store, report.run_id, page)
