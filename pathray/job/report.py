"""The run report: what one run did, saved as ``_runs/<run_id>/report.json`` and printed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunReport:
    """What a run did; saved as ``_runs/<run_id>/report.json`` and printed at the end."""

    run_id: str
    store: str
    started_at: float
    ended_at: float = 0.0
    #: per model, [start of its first encode call, end of its last], unix seconds
    encode_window: dict[str, list[float]] = field(default_factory=dict)
    slides_in_manifest: int = 0
    slides_skipped: int = 0  # every requested model already committed
    pairs_to_do: int = 0  # (slide, model) pairs this run set out to do
    committed_before: dict[str, int] = field(default_factory=dict)  # per model: slides already committed
    chunks_done: int = 0  # chunk rows the driver has seen (progress)
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)  # ok / no_tissue / error / tiles
    tiles_planned: int = 0
    tiles_read: int = 0
    errors: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)  # summed per stage over all workers
    aborted: str | None = None  # why the run stopped early (then re-running resumes it)
    runner: str = ""  # "ray" or "local" (pathray.job.localrun.choose_runner); "" when nothing was to do
    resources: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: pathray.monitor.watch.RunWatch samples: seconds since the start, cumulative tiles read / written per model
    timeline: list[dict[str, Any]] = field(default_factory=list)
    html: str = ""  # the run's report.html, once written

    @property
    def wall_s(self) -> float:
        return self.ended_at - self.started_at

    @property
    def steady_tiles_per_s(self) -> float:
        """Tiles per second while the encoders worked: tiles read / the longest per-model window
        from the first encode call's start to the last one's end (start-up, model loading and
        the commit tail excluded)."""
        spans = [end - start for start, end in self.encode_window.values() if end > start]
        return self.tiles_read / max(spans) if spans else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every slide ended ok or without tissue, 1 when any error was recorded."""
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["wall_s"] = self.wall_s
        d["tiles_per_s"] = self.tiles_read / self.wall_s if self.wall_s > 0 else 0.0
        d["steady_tiles_per_s"] = self.steady_tiles_per_s
        d["tiles_per_busy_s"] = {k: (self.tiles_read / v if v > 0 else None) for k, v in self.busy_s.items()}
        d["exit_code"] = self.exit_code
        return d

    def summary(self) -> str:
        before = sum(self.committed_before.values())
        lines = [
            f"pathray run {self.run_id}: {self.wall_s:.1f} s, store {self.store}",
            f"  slides: {self.slides_in_manifest} in manifest, {self.slides_skipped} with every model already "
            f"committed; (slide, model) pairs: {self.pairs_to_do} to do, {before} already committed",
            f"  tiles: {self.tiles_planned} planned, {self.tiles_read} read"
            + (f" ({self.tiles_read / self.wall_s:.1f} tiles/s)" if self.wall_s > 0 else ""),
        ]
        for model, counts in self.per_model.items():
            lines.append(
                f"  {model}: "
                + ", ".join(f"{k} {v}" for k, v in counts.items())
                + f", already committed {self.committed_before.get(model, 0)}"
            )
        lines.append(f"  errors recorded: {self.errors}")
        return "\n".join(lines)
