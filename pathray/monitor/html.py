"""``_runs/<run_id>/report.html``: one self-contained page per run (embed and aggregate).

No server and no network: inline CSS and JavaScript, the throughput plot as inline SVG,
QC thumbnails as ``data:`` URIs linked to the full QC PNGs written next to the page
(``qc/<slide_id>.png``). Sections: summary, throughput over time per stage (from the
driver's :class:`~pathray.monitor.watch.RunWatch` series), a per-slide table (sortable by a click on
a header, filterable by text; a link's ``#filter=TEXT&sort=[-]COLUMN`` does both on load),
errors grouped by type with their slide ids, QC gallery.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from typing import Any

from pathray.store import FeatureStore
from pathray.store.layout import RUN_PAGE, RUN_STATUS

#: the per-slide table shows at most this many rows (the full table: slides-*.parquet)
MAX_TABLE_ROWS = 5000
PLOT_W, PLOT_H, PLOT_BINS = 720, 220, 60
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass
class RunPage:
    """What the page shows. ``series``: RunWatch samples (``t_s`` and cumulative counts);
    ``stages``: stage name -> a function of a sample giving that stage's cumulative tiles;
    ``slides``: rows with slide_id, model, status, n_tiles, error_type, error_message;
    ``gallery``: (slide_id, thumbnail PNG bytes, full QC PNG bytes)."""

    title: str
    summary: list[tuple[str, str]]
    series: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)
    slides: list[dict[str, Any]] = field(default_factory=list)
    slides_total: int = 0
    gallery: list[tuple[str, bytes, str]] = field(default_factory=list)


def run_status_rows(store: FeatureStore, run_id: str) -> tuple[list[dict[str, Any]], int]:
    """The run's status rows (``_runs/<run_id>/slides-*.parquet``), at most
    :data:`MAX_TABLE_ROWS`, and how many there are."""
    import pyarrow.parquet as pq

    files = sorted(store.fs.glob(store.path(RUN_STATUS.glob(run_id=run_id))))
    if not files:
        return [], 0
    columns = ["slide_id", "model", "status", "n_tiles", "error_type", "error_message"]
    tables = [pq.read_table(f, columns=columns, filesystem=store.fs) for f in files]
    total = sum(t.num_rows for t in tables)
    rows: list[dict[str, Any]] = []
    for t in tables:
        rows += t.slice(0, MAX_TABLE_ROWS - len(rows)).to_pylist()
    return rows, total


def write_run_html(store: FeatureStore, run_id: str, page: RunPage) -> str:
    """Write the page and its full QC images (``qc/<slide_id>.png``) under ``_runs/<run_id>/``;
    returns the page's URI."""
    for slide_id, _, full in page.gallery:
        store.write_bytes(f"{RUN_PAGE.dir(run_id=run_id)}/{qc_link(slide_id)}", full)
    store.write_bytes(RUN_PAGE.file(run_id=run_id), render(page).encode("utf-8"))
    return store.path(RUN_PAGE.file(run_id=run_id))


def qc_link(slide_id: str) -> str:
    """The full QC image's path relative to the page."""
    return "qc/" + re.sub(r"[^A-Za-z0-9._-]", "_", slide_id) + ".png"


def render(page: RunPage) -> str:
    """The whole page as one HTML string."""
    e = html.escape
    summary = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in page.summary)
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(page.title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{e(page.title)}</h1>"
        f"<section id=summary><h2>Summary</h2><table class=kv>{summary}</table></section>"
        f"<section id=throughput><h2>Throughput over time</h2>{throughput_svg(page.series, page.stages)}</section>"
        f"<section id=errors><h2>Errors by type</h2>{_errors_html(page.slides)}</section>"
        f"<section id=slides><h2>Slides</h2>{_slides_html(page)}</section>"
        f"<section id=qc><h2>QC gallery</h2>{_gallery_html(page.gallery)}</section>"
        f"<script>{JS}</script></body></html>"
    )


def throughput_svg(series: list[dict[str, Any]], stages: dict[str, Any]) -> str:
    """Tiles/s per stage against minutes since the start, binned into :data:`PLOT_BINS`
    intervals of the cumulative counts (linear between samples)."""
    if len(series) < 2 or series[-1]["t_s"] <= 0 or not stages:
        return "<p class=note>Too short a run to plot.</p>"
    end = series[-1]["t_s"]
    edges = [end * k / PLOT_BINS for k in range(PLOT_BINS + 1)]
    rates = {name: _binned_rates(series, get, edges) for name, get in stages.items()}
    top = max((max(r) for r in rates.values()), default=0.0) or 1.0
    pad = 44
    w, h = PLOT_W - pad - 10, PLOT_H - 34

    def xy(t: float, v: float) -> str:
        return f"{pad + w * t / end:.1f},{10 + h - h * v / top:.1f}"

    lines, legend = [], []
    for i, (name, rate) in enumerate(rates.items()):
        color = COLORS[i % len(COLORS)]
        points = " ".join(xy((edges[k] + edges[k + 1]) / 2, v) for k, v in enumerate(rate))
        dash = " stroke-dasharray='5 3'" if i == 0 else ""  # the read stage, under the first model's when equal
        lines.append(
            f'<polyline class=stage data-stage="{html.escape(name)}" fill=none stroke="{color}"{dash} '
            f'stroke-width=1.5 points="{points}"/>'
        )
        legend.append(f'<span style="color:{color}">&#9632; {html.escape(name)}</span>')
    axes = (
        f"<line x1={pad} y1={10 + h} x2={pad + w} y2={10 + h} stroke=#888 />"
        f"<line x1={pad} y1=10 x2={pad} y2={10 + h} stroke=#888 />"
        f"<text x={pad - 4} y=16 text-anchor=end>{top:.0f}</text><text x={pad - 4} y={10 + h} text-anchor=end>0</text>"
        f"<text x={pad} y={PLOT_H - 6}>0</text>"
        f"<text x={pad + w} y={PLOT_H - 6} text-anchor=end>{end / 60:.1f} min</text>"
        f"<text x={pad + w / 2} y={PLOT_H - 6} text-anchor=middle>tiles/s over time</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width={PLOT_W} height={PLOT_H} '
        f'viewBox="0 0 {PLOT_W} {PLOT_H}">{axes}{"".join(lines)}</svg><p class=legend>{" ".join(legend)}</p>'
    )


def _binned_rates(series: list[dict[str, Any]], get: Any, edges: list[float]) -> list[float]:
    times = [s["t_s"] for s in series]
    values = [float(get(s)) for s in series]

    def at(t: float) -> float:
        for k in range(1, len(times)):
            if times[k] >= t:
                span = times[k] - times[k - 1]
                return (
                    values[k] if span <= 0 else values[k - 1] + (values[k] - values[k - 1]) * (t - times[k - 1]) / span
                )
        return values[-1]

    cumulative = [at(t) for t in edges]
    return [(cumulative[k + 1] - cumulative[k]) / (edges[k + 1] - edges[k]) for k in range(len(edges) - 1)]


def _slides_html(page: RunPage) -> str:
    e = html.escape
    head = "".join(f"<th>{c}</th>" for c in ("Slide", "Model", "Status", "Tiles", "Error type", "Error message"))
    body = "".join(
        f"<tr class={e(r['status'])}><td>{e(r['slide_id'])}</td><td>{e(r['model'])}</td><td>{e(r['status'])}</td>"
        f"<td>{r['n_tiles'] or 0}</td><td>{e(r['error_type'] or '')}</td><td>{e((r['error_message'] or '')[:500])}</td></tr>"
        for r in page.slides
    )
    note = (
        f"<p class=note>First {len(page.slides)} of {page.slides_total} rows; all of them: the run's "
        "slides-*.parquet.</p>"
        if page.slides_total > len(page.slides)
        else ""
    )
    return (
        f"<input id=filter placeholder='filter rows (any text)'>{note}"
        f"<table id=slide-table class=grid><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _errors_html(slides: list[dict[str, Any]]) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in slides:
        if r["status"] == "error":
            groups.setdefault(r["error_type"] or "error", []).append(r)
    if not groups:
        return "<p class=note>No errors.</p>"
    e = html.escape
    items = "".join(
        f"<li><b>{e(kind)}</b> ({len(rows)}): {e(', '.join(sorted({r['slide_id'] for r in rows})))}"
        f"<br><span class=msg>{e((rows[0]['error_message'] or '')[:300])}</span></li>"
        for kind, rows in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    )
    return f"<ul class=errors>{items}</ul>"


def _gallery_html(gallery: list[tuple[str, bytes, str]]) -> str:
    if not gallery:
        return "<p class=note>No QC images for this run.</p>"
    e = html.escape
    return (
        "<div class=gallery>"
        + "".join(
            f"<figure><a href='{e(qc_link(slide_id))}'><img alt='{e(slide_id)}' src='data:image/png;base64,"
            f"{base64.b64encode(thumb).decode()}'></a><figcaption>{e(slide_id)}</figcaption></figure>"
            for slide_id, thumb, _ in gallery
        )
        + "</div>"
    )


def png_bytes(image: Any, long_side_px: int | None = None) -> bytes:
    """A PIL image as PNG bytes, shrunk to ``long_side_px`` on its long side when given."""
    if long_side_px is not None:
        image = image.copy()
        image.thumbnail((long_side_px, long_side_px))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table.kv th{text-align:left;padding-right:16px;font-weight:600}
table.grid{border-collapse:collapse;width:100%}table.grid td,table.grid th{border:1px solid #ddd;padding:3px 6px}
table.grid th{background:#f4f4f4;cursor:pointer;user-select:none}
table.grid td:nth-child(-n+5){white-space:nowrap}table.grid td:nth-child(6){font-size:12px}
tr.error td{background:#fdecea}tr.no_tissue td{color:#777}
#filter{margin:6px 0;padding:4px;width:320px}.note{color:#666}.msg{color:#666;font-size:12px}
.legend span{margin-right:16px}svg text{font-size:11px;fill:#444}
.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:260px}
figure img{max-width:256px;max-height:256px;border:1px solid #ccc}figcaption{font-size:12px}
"""

JS = """
(function(){
var table=document.getElementById('slide-table');if(!table)return;
var body=table.tBodies[0],input=document.getElementById('filter');
function filter(q){q=q.toLowerCase();
 Array.prototype.forEach.call(body.rows,function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)<0?'none':'';});}
function sort(col,asc){
 var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){
  var x=a.cells[col].textContent,y=b.cells[col].textContent,nx=parseFloat(x),ny=parseFloat(y);
  var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
 rows.forEach(function(r){body.appendChild(r);});}
input.addEventListener('input',function(){filter(input.value);});
Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
 th.addEventListener('click',function(){var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';sort(col,asc);});});
// a link can carry both: report.html#filter=error&sort=-3 (column 3, descending)
var h=new URLSearchParams(location.hash.slice(1));
if(h.get('filter')){input.value=h.get('filter');filter(input.value);}
if(h.get('sort')){sort(Math.abs(parseInt(h.get('sort'),10)),h.get('sort').charAt(0)!=='-');}
})();
"""
