"""The driver's completion tracking, on its edge cases (no Ray needed)."""

from __future__ import annotations

from pathray.job.tracker import Complete, CompletionTracker, Failed


def row(slide="s", model="m", index=0, n=2, status="ok", **extra):
    return {
        "slide_id": slide,
        "model": model,
        "chunk_index": index,
        "n_chunks": n,
        "status": status,
        "chunk_id": f"{slide}.c{index}" if status == "ok" and n else "",
        **extra,
    }


def test_complete_after_every_chunk_in_chunk_order_whatever_the_arrival_order():
    t = CompletionTracker()
    assert t.add(row(index=1, n=3)) is None and t.add(row(index=0, n=3)) is None
    assert t.in_flight == 1
    done = t.add(row(index=2, n=3))
    assert isinstance(done, Complete) and done.chunk_ids == ("s.c0", "s.c1", "s.c2") and t.in_flight == 0


def test_first_error_decides_and_late_chunks_are_dropped():
    t = CompletionTracker()
    assert t.add(row(index=0)) is None
    failed = t.add(row(index=1, status="error", error_type="slide_unreadable"))
    assert isinstance(failed, Failed) and failed.row["error_type"] == "slide_unreadable"
    assert t.add(row(index=0)) is None and t.add(row(index=1, status="error")) is None and t.in_flight == 0


def test_slide_without_tissue_completes_with_no_chunks():
    done = CompletionTracker().add(row(n=0, status="no_tissue"))
    assert isinstance(done, Complete) and done.chunk_ids == ()


def test_two_models_interleaved_are_tracked_apart():
    t = CompletionTracker()
    assert t.add(row(model="a", index=0)) is None
    assert t.add(row(model="b", index=1)) is None
    assert t.add(row(model="b", index=1)) is None  # a duplicate row of b's chunk 1
    decided = [t.add(row(model="a", index=1)), t.add(row(model="b", index=0))]
    assert [(d.model, d.chunk_ids) for d in decided] == [("a", ("s.c0", "s.c1")), ("b", ("s.c0", "s.c1"))]


def test_a_retried_tasks_duplicate_rows_never_decide_twice():
    t = CompletionTracker()
    assert t.add(row(index=0)) is None
    assert t.add(row(index=0)) is None  # duplicate before completion: still waiting for chunk 1
    assert isinstance(t.add(row(index=1)), Complete)
    assert t.add(row(index=1)) is None and t.add(row(index=0)) is None  # after: ignored, no second commit
    single = CompletionTracker()
    assert isinstance(single.add(row(slide="one", n=1)), Complete)
    assert single.add(row(slide="one", n=1)) is None
