"""The live progress display (pathray.monitor.watch.RunWatch): its figures on a fake clock, the
concise line a non-terminal stream gets, and the tqdm bars a terminal gets."""

from __future__ import annotations

import io

import pytest

from pathray.monitor import watch as watch_module
from pathray.monitor.watch import RunWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(watch_module.time, "time", c.time)
    return c


def test_rate_over_the_last_minute_eta_and_errors_by_type(clock):
    w = RunWatch({"m": 4, "n": 2})
    clock.now += 30
    w.add_tiles("m", 100, read=100)
    w.decided("m", "ok")
    w.tick()
    clock.now += 60  # 90 s in: the window starts at the 30 s sample (100 tiles)
    w.add_tiles("m", 60, read=60)
    w.decided("m", "error", "SlideOpenError")
    w.decided("m", "error", "SlideOpenError")
    w.decided("n", "error", "TileReadError")
    w.tick()
    assert w.tiles_per_s("m") == pytest.approx(60 / 60)
    assert w.eta_s("m") == pytest.approx((4 - 3) * 90 / 3)
    assert w.eta_s("n") == pytest.approx((2 - 1) * 90 / 1)
    line = w.line()
    assert "m 3/4 slides, 1.0 tiles/s (last min), ETA 30s, errors: SlideOpenError 2" in line
    assert "n 1/2 slides" in line and "errors: TileReadError 1" in line
    assert [s["t_s"] for s in w.series] == [0.0, 30.0, 90.0]
    assert w.series[-1]["read"] == 160 and w.series[-1]["written"] == {"m": 160, "n": 0}


def test_non_terminal_stream_gets_one_line_per_interval(clock):
    out = io.StringIO()
    w = RunWatch({"m": 2}, out)
    for _ in range(10):  # 10 ticks 5 s apart: 50 s, so exactly one line (at 30 s)
        clock.now += 5
        w.add_tiles("m", 10)
        w.tick()
    w.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[30s] m 0/2 slides")


def test_series_stays_bounded_on_a_long_run(clock):
    w = RunWatch({"m": 1})
    for _ in range(5000):
        clock.now += 1
        w.add_tiles("m", 1)
        w.tick()
    assert len(w.series) <= watch_module.MAX_SAMPLES
    w.close()  # the last sample is the run's end
    assert w.series[0]["t_s"] == 0.0 and w.series[-1] == {
        "t_s": 5000.0,
        "read": 0,
        "written": {"m": 5000},
        "done": {"m": 0},
    }


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_bar_per_model():
    out = Terminal()
    w = RunWatch({"kaiko-vits16": 3, "uni": 3}, out)
    w.add_tiles("kaiko-vits16", 40)
    w.decided("kaiko-vits16", "ok")
    w.decided("uni", "error", "EncoderError")
    w.tick()
    w.close()
    text = out.getvalue()
    assert "kaiko-vits16" in text and "1/3 slides" in text
    assert "uni" in text and "errors: EncoderError 1" in text
