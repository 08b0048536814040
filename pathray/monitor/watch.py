"""What a person watching a run sees: one live progress display, and the time series the
run's HTML report plots (:mod:`pathray.monitor.html`).

:class:`RunWatch` is fed by the driver loop (both runners: :func:`pathray.job.drive.drive`,
:func:`pathray.slide_level.job.run_aggregate`). Per model it keeps slides done / to do,
tiles written, errors by type, and a downsampled series of cumulative tiles (read, and
written per model) against seconds since the start. On a terminal it draws one tqdm bar
per model (slides done / total, tiles/s over the last minute, ETA, errors so far by type);
on any other stream it writes one concise line every :data:`LINE_EVERY_S` seconds; with no
stream it shows nothing and only records.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, TextIO

#: tiles/s are measured over this trailing window
RATE_WINDOW_S = 60.0
#: a non-terminal stream gets one progress line this often
LINE_EVERY_S = 30.0
#: the time series keeps at most about this many samples (older ones are thinned)
MAX_SAMPLES = 600


class RunWatch:
    """Progress of one run. ``totals``: (slide, model) pairs to do per model; ``stream``:
    where to show it (None: record only); ``read_stage``: the name of the stage whose tiles
    are counted once per chunk (``"read"`` for embed, ``"load"`` for aggregate)."""

    def __init__(self, totals: dict[str, int], stream: TextIO | None = None, read_stage: str = "read"):
        self.totals = dict(totals)
        self.started = time.time()
        self.done = {m: 0 for m in totals}
        self.tiles = {m: 0 for m in totals}
        self.errors = {m: Counter() for m in totals}
        self.read_stage, self.tiles_read = read_stage, 0
        self.series: list[dict[str, Any]] = [self._sample(0.0)]
        self.stream = stream
        self._step_s, self._last_line = 1.0, self.started
        self.bars = _bars(totals, stream) if stream is not None and _is_tty(stream) else None

    # --- fed by the driver loop ---------------------------------------------------------
    def add_tiles(self, model: str, written: int, read: int = 0) -> None:
        """Tiles of one result row: ``written`` for ``model``, ``read`` once per chunk."""
        self.tiles[model] = self.tiles.get(model, 0) + written
        self.tiles_read += read

    def decided(self, model: str, status: str, error_type: str = "") -> None:
        """One (slide, model) pair decided: ok, no_tissue or error (of ``error_type``)."""
        self.done[model] = self.done.get(model, 0) + 1
        if status == "error":
            self.errors.setdefault(model, Counter())[error_type or "error"] += 1
        if self.bars is not None and model in self.bars:
            self.bars[model].update(1)

    def tick(self) -> None:
        """Record a sample (at most one per step) and refresh what is shown."""
        now = time.time()
        if now - self.started - self.series[-1]["t_s"] >= self._step_s:
            self.series.append(self._sample(now - self.started))
            if len(self.series) > MAX_SAMPLES:
                self.series = self.series[::2]
                self._step_s *= 2
        if self.bars is not None:
            for model, bar in self.bars.items():
                bar.set_postfix_str(self._postfix(model), refresh=True)
        elif self.stream is not None and now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Take a last sample and close the bars (left on screen)."""
        self.series.append(self._sample(time.time() - self.started))
        if self.bars is not None:
            for model, bar in self.bars.items():
                bar.set_postfix_str(self._postfix(model), refresh=False)
                bar.close()
            self.bars = None

    # --- figures ------------------------------------------------------------------------
    def tiles_per_s(self, model: str) -> float:
        """Tiles written for ``model`` per second over the last :data:`RATE_WINDOW_S`."""
        now_s, now_tiles = time.time() - self.started, self.tiles.get(model, 0)
        past = next((s for s in reversed(self.series) if now_s - s["t_s"] >= RATE_WINDOW_S), self.series[0])
        span = now_s - past["t_s"]
        return (now_tiles - past["written"].get(model, 0)) / span if span > 0 else 0.0

    def eta_s(self, model: str) -> float | None:
        """Seconds left for ``model`` at its mean pace so far (None before its first slide)."""
        done = self.done.get(model, 0)
        if not done:
            return None
        return (self.totals.get(model, 0) - done) * (time.time() - self.started) / done

    def line(self) -> str:
        """One line for a non-terminal stream: every model's figures, ``; ``-separated."""
        parts = []
        for model in self.totals:
            eta = self.eta_s(model)
            parts.append(
                f"{model} {self.done[model]}/{self.totals[model]} slides, "
                f"{self.tiles_per_s(model):.1f} tiles/s (last min), ETA "
                f"{'?' if eta is None else _duration(eta)}{_errors_text(self.errors[model])}"
            )
        return f"[{_duration(time.time() - self.started)}] " + "; ".join(parts)

    def _postfix(self, model: str) -> str:
        return f"{self.tiles_per_s(model):.1f} tiles/s{_errors_text(self.errors[model])}"

    def _sample(self, t_s: float) -> dict[str, Any]:
        return {
            "t_s": round(t_s, 2),
            self.read_stage: self.tiles_read,
            "written": dict(self.tiles),
            "done": dict(self.done),
        }


def _errors_text(errors: Counter) -> str:
    return (", errors: " + ", ".join(f"{k} {v}" for k, v in errors.most_common())) if errors else ""


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _bars(totals: dict[str, int], stream: TextIO) -> dict[str, Any]:
    from tqdm import tqdm

    fmt = "{desc} {bar:24} {n_fmt}/{total_fmt} slides [{elapsed}<{remaining}{postfix}]"
    width = max(len(m) for m in totals) if totals else 0
    return {
        m: tqdm(
            total=n,
            desc=m.ljust(width),
            file=stream,
            position=i,
            leave=True,
            dynamic_ncols=True,
            bar_format=fmt,
            mininterval=0.5,
        )
        for i, (m, n) in enumerate(totals.items())
    }
