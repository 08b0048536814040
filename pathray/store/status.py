"""What is in a feature store, read without writing to it: models and their tilings, slides
committed / failed by error type / never tried (given a manifest), the runs with their dates
and wall times, and the slide-level aggregations present.

Costs a few listings and small reads: the store config, the commit-record folders, the status
table (``slides.parquet``), the run reports and the slide-level record folders; no features
file is opened.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from pathray.store import FeatureStore, model_tiling


def store_status(store: FeatureStore, manifest_ids: list[str] | None = None) -> dict[str, Any]:
    """The store's summary as a JSON-able dict (see the module doc). ``manifest_ids``: slide ids
    of a manifest, to count the slides of it never tried per model."""
    config = store.read_config()
    if config is None:
        raise FileNotFoundError(f"no pathray store at {store.root} (no {store.path('_pathray_store.json')})")
    latest = _latest_status(store)
    models = {}
    for name, record in sorted(config.get("models", {}).items()):
        models[name] = _model_status(store, config, name, record, latest.get(name, {}), manifest_ids)
    return {
        "store": store.root,
        "format": config.get("format"),
        "created_by": config.get("created_by"),
        "models": models,
        "runs": _runs(store),
        "aggregations": _aggregations(store),
    }


def _model_status(
    store: FeatureStore, config: dict, name: str, record: dict, latest: dict[str, dict], manifest_ids: list[str] | None
) -> dict[str, Any]:
    committed = store.committed(name)
    errors = Counter(r["error_type"] for sid, r in latest.items() if r["status"] == "error" and sid not in committed)
    tiling = model_tiling(config, name)
    out = {
        "embed_dim": record.get("embed_dim"),
        "weights": record.get("weights"),
        "tiling": {"tile_px": tiling.get("tile_px"), "target_mpp": tiling.get("target_mpp")},
        "committed": len(committed),
        "no_tissue": sum(1 for sid, r in latest.items() if r["status"] == "no_tissue" and sid in committed),
        "errors": dict(sorted(errors.items())),
    }
    if manifest_ids is not None:
        tried = committed | set(latest)
        out["never_tried"] = sum(1 for sid in manifest_ids if sid not in tried)
    return out


def _latest_status(store: FeatureStore) -> dict[str, dict[str, dict]]:
    """model -> slide id -> its status row in ``slides.parquet`` ({} when there is none)."""
    try:
        rows = store.slides().to_pylist()
    except (FileNotFoundError, OSError):
        return {}
    latest: dict[str, dict[str, dict]] = {}
    for row in rows:
        latest.setdefault(row["model"], {})[row["slide_id"]] = row
    return latest


def _runs(store: FeatureStore) -> list[dict[str, Any]]:
    """One entry per run report under ``_runs/``, oldest first."""
    try:
        paths = store.fs.glob(store.path("_runs", "*", "report.json"))
    except FileNotFoundError:
        return []
    runs = []
    for path in paths:
        try:
            with store.fs.open(path, "rb") as f:
                report = json.load(f)
        except (OSError, ValueError):
            continue
        started, ended = report.get("started_at") or 0.0, report.get("ended_at") or 0.0
        runs.append(
            {
                "run_id": report.get("run_id") or os.path.basename(os.path.dirname(path)),
                "kind": _run_kind(report),
                "started_at": started,
                "wall_s": round(ended - started, 1) if ended and started else None,
                "errors": report.get("errors", (report.get("counts") or {}).get("error")),
                "aborted": report.get("aborted") or "",
            }
        )
    return sorted(runs, key=lambda r: r["started_at"])


def _run_kind(report: dict[str, Any]) -> str:
    """``aggregate``, ``import`` (``pathray import``'s reports have runner ``import``) or ``embed``."""
    if "aggregator" in report:
        return "aggregate"
    return "import" if report.get("runner") == "import" else "embed"


def _aggregations(store: FeatureStore) -> list[dict[str, Any]]:
    """(model, aggregator, committed slides) for every slide-level output folder."""
    try:
        folders = store.fs.glob(store.path("_commits", "slide_features", "model=*", "aggregator=*"))
    except FileNotFoundError:
        return []
    out = []
    for folder in sorted(f for f in folders if not f.endswith(".json")):  # <aggregator>.json: its pinned identity
        model = os.path.basename(os.path.dirname(folder))[len("model=") :]
        aggregator = os.path.basename(folder)[len("aggregator=") :]
        out.append({"model": model, "aggregator": aggregator, "slides": len(store.aggregated(model, aggregator))})
    return out


def format_status(status: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    import time

    lines = [f"store {status['store']} ({status['created_by']}, format {status['format']})", "", "models:"]
    for name, m in status["models"].items():
        errors = ", ".join(f"{k} {v}" for k, v in m["errors"].items()) or "none"
        never = f", never tried {m['never_tried']}" if "never_tried" in m else ""
        lines.append(
            f"  {name}: {m['committed']} slides committed ({m['no_tissue']} without tissue), "
            f"errors: {errors}{never}; {m['embed_dim']}-d, tiles {m['tiling']['tile_px']} px at "
            f"{m['tiling']['target_mpp']} µm/px"
        )
    lines += ["", f"runs ({len(status['runs'])}):"]
    for r in status["runs"]:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r["started_at"])) if r["started_at"] else "?"
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] is not None else "unfinished"
        aborted = f", aborted: {r['aborted'][:80]}" if r["aborted"] else ""
        lines.append(f"  {r['run_id']} ({r['kind']}) {when}, {wall}, {r['errors'] or 0} errors{aborted}")
    lines += ["", "slide-level aggregations:" if status["aggregations"] else "slide-level aggregations: none"]
    lines += [f"  {a['model']} -> {a['aggregator']}: {a['slides']} slides" for a in status["aggregations"]]
    return "\n".join(lines)
