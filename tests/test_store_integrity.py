"""Store integrity across runs (issue 20, round 3), on real slide files with the in-process
runner: a slide is read once whatever a killed run left, a slide id committed from another
slide is an error (never "already done"), non-finite embeddings are never stored (and a
store holding some is refused by MIL), kept manifest columns survive a run without them,
export never mixes models, and local commits are fsync-ed in order."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.feature_stores import commit_slide, ensure_store, grid, write_planted_store
from fixtures.slides import write_manifest

from pathray.encoders.custom import CustomEncoder
from pathray.exchange.export import ExportConflictError, export_store
from pathray.job.config import build_job_config
from pathray.job.estimate import dry_run_plan
from pathray.job.raydata import run_job
from pathray.mil import TrainConfig, train
from pathray.mil.bags import index_bags
from pathray.mil.labels import PatientFallbackWarning, join_labels
from pathray.mil.splits import Fold, Splits
from pathray.slide_level.aggregators import slide_embeddings
from pathray.store import FeatureStore
from pathray.testing import SleepEncoder, sleep_encoder

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sleep"


def embed(tmp_path: Path, manifest: Path, encoder: CustomEncoder | None = None, **raw):
    """One `pathray embed` run of the stand-in encoder on the in-process runner."""
    config = build_job_config(
        {
            "manifest": str(manifest),
            "out": str(tmp_path / "store"),
            "models": [MODEL],
            "tiling": {"tile_px": 224, "target_mpp": 0.5},
            "chunk_tiles": 4,
            "runner": "local",
            **raw,
        }
    )
    return config, run_job(config, {MODEL: encoder or sleep_encoder(tiles_per_s=1e5)}, progress_bars=False)


# --- 2. a slide is read once, whatever a killed run left under another cohort ----------------
def test_a_killed_runs_copy_under_another_cohort_is_never_read(synthetic_svs_05, tmp_path):
    _, first = embed(tmp_path, write_manifest(tmp_path / "a.csv", [{"path": str(synthetic_svs_05), "cohort": "A"}]))
    store = FeatureStore(str(tmp_path / "store"))
    slide_id = "synthetic_05"
    n_tiles = first.per_model[MODEL]["tiles"]
    # run 1 killed after writing its features file, before its commit record
    os.remove(store.commit_path(MODEL, slide_id))
    _, second = embed(tmp_path, write_manifest(tmp_path / "b.csv", [{"path": str(synthetic_svs_05), "cohort": "B"}]))
    assert second.per_model[MODEL]["ok"] == 1

    table = store.dataset(MODEL).to_table()
    assert table.num_rows == n_tiles > 0
    assert set(table.column("cohort").to_pylist()) == {"B"}
    pooled = slide_embeddings(store.dataset(MODEL), "mean")
    assert pooled.column("slide_id").to_pylist() == [slide_id]
    assert index_bags(store, MODEL).slides.column("slide_id").to_pylist() == [slide_id]
    # the stale copy is gone, so a plain glob over features/ sees the slide once too
    assert [p.parent.name for p in (tmp_path / "store" / "features").rglob("*.parquet")] == ["cohort=B"]


def test_a_rerun_deletes_staged_chunks_a_killed_commit_left_behind(synthetic_svs_05, tmp_path):
    """Killed between the commit record and the deletion of the staged chunks: the re-run
    skips the slide and deletes its leftover chunks."""
    manifest = write_manifest(tmp_path / "m.csv", [{"path": str(synthetic_svs_05)}])
    embed(tmp_path, manifest)
    store = FeatureStore(str(tmp_path / "store"))
    features = tmp_path / "store" / store.commit_record(MODEL, "synthetic_05").features_path
    leftover = Path(store.staging_path(MODEL, "synthetic_05", "synthetic_05.c00000"))
    leftover.parent.mkdir(parents=True, exist_ok=True)  # the commit deleted the chunks, not the folder
    shutil.copy(features, leftover)
    _, report = embed(tmp_path, manifest)
    assert report.slides_skipped == 1
    assert not leftover.parent.exists()


# --- 3. a slide id committed from another slide is an error, not "already done" -------------
def test_same_id_from_another_cohort_is_a_conflict_never_a_silent_skip(synthetic_svs_05, synthetic_svs_025, tmp_path):
    for cohort, source in (("brca", synthetic_svs_05), ("luad", synthetic_svs_025)):
        (tmp_path / cohort).mkdir()
        shutil.copy(source.path, tmp_path / cohort / "slide1.svs")
    brca = write_manifest(tmp_path / "brca.csv", [{"path": str(tmp_path / "brca/slide1.svs"), "cohort": "brca"}])
    luad = write_manifest(tmp_path / "luad.csv", [{"path": str(tmp_path / "luad/slide1.svs"), "cohort": "luad"}])
    embed(tmp_path, brca)
    store = FeatureStore(str(tmp_path / "store"))
    committed_file = (tmp_path / "store" / store.commit_record(MODEL, "slide1").features_path).read_bytes()

    config, report = embed(tmp_path, luad)
    assert report.slides_skipped == 0 and report.per_model[MODEL]["error"] == 1 and report.exit_code == 1
    errors = store.errors().to_pylist()
    assert [(e["slide_id"], e["error_type"], e["stage"]) for e in errors] == [("slide1", "slide_id_conflict", "plan")]
    assert "luad/slide1.svs" in errors[0]["message"] and "brca/slide1.svs" in errors[0]["message"]
    plan = dry_run_plan(config, custom_encoders={MODEL: sleep_encoder(tiles_per_s=1e5)})  # says the same
    assert plan["slides_to_do"] == 0 and plan["slides_already_committed"] == 0
    assert [(c["slide_id"], c["error_type"]) for c in plan["slide_id_conflicts"]] == [("slide1", "slide_id_conflict")]
    # the committed slide is untouched, and re-running its own manifest still skips it
    record = store.commit_record(MODEL, "slide1")
    assert (record.cohort, record.slide["path"]) == ("brca", str(tmp_path / "brca/slide1.svs"))
    assert (tmp_path / "store" / record.features_path).read_bytes() == committed_file
    _, again = embed(tmp_path, brca)
    assert again.slides_skipped == 1 and again.exit_code == 0


# --- 4. non-finite embeddings -----------------------------------------------------------------
class OverflowingEncoder(SleepEncoder):
    """The stand-in encoder with values past float16's range (65504): they overflow to inf."""

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return super().__call__(tiles).astype(np.float32) * 1e5


def test_non_finite_embeddings_are_an_error_row_and_never_stored(synthetic_svs_05, tmp_path):
    encoder = CustomEncoder(
        factory=lambda: OverflowingEncoder(1e5, 8, "float32"),
        record={"model": "overflow", "embed_dim": 8},
        output_dtype="float16",
    )
    manifest = write_manifest(tmp_path / "m.csv", [{"path": str(synthetic_svs_05)}])
    _, report = embed(tmp_path, manifest, encoder)
    store = FeatureStore(str(tmp_path / "store"))
    assert report.per_model[MODEL]["ok"] == 0 and report.exit_code == 1
    [error] = store.errors().to_pylist()
    assert (error["error_type"], error["stage"]) == ("non_finite_embedding", "encode")
    assert store.committed(MODEL) == set()
    assert list((tmp_path / "store").glob("features/**/*.parquet")) == []


def nan_store(root: Path) -> tuple[str, str]:
    """A planted store (as written before the job checked embeddings) with one NaN tile in
    one slide; returns (model, that slide's id)."""
    planted = write_planted_store(root, n_patients=8, slides_per_patient=1, dim=8)
    slide_id = "p03-s0"
    emb = np.random.default_rng(1).normal(size=(20, 8))
    emb[7, 2] = np.nan
    commit_slide(FeatureStore(str(root)), planted.model, slide_id, grid(20), emb, "case-03")
    return planted.model, slide_id


@pytest.mark.slow  # a `pathray mil train` subprocess
def test_mil_refuses_a_store_with_nan_embeddings_naming_the_slides(tmp_path):
    model, slide_id = nan_store(tmp_path / "store")
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,label\n" + "".join(f"case-{p:02d},{p % 2}\n" for p in range(8)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathray.cli",
            "mil",
            "train",
            "--store",
            str(tmp_path / "store"),
            "--model",
            model,
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "run"),
            "--folds",
            "2",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 2, out.stderr
    assert slide_id in out.stderr and "NaN/inf" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_json_holds_no_nan_when_a_fold_has_no_validation_slides(tmp_path):
    planted = write_planted_store(tmp_path / "store", n_patients=4, slides_per_patient=1, dim=8)
    slides = sorted(planted.labels.column("slide_id").to_pylist())
    # two folds, each testing one slide of each class, training on the rest, no validation part
    tests = [[slides[0], slides[1]], [slides[2], slides[3]]]
    splits = Splits(0, 2, 0.2, [Fold(k, [s for s in slides if s not in t], [], t) for k, t in enumerate(tests)])
    train(
        str(tmp_path / "store"),
        planted.model,
        planted.labels,
        out=tmp_path / "run",
        splits=splits,
        config=TrainConfig(n_folds=2, max_epochs=2, cpu_threads=1),
    )

    def refuse(constant):
        raise AssertionError(f"run.json holds {constant}")

    record = json.loads((tmp_path / "run" / "run.json").read_text(), parse_constant=refuse)
    assert [f["best_val_loss"] for f in record["folds"]] == [None, None]
    assert all(h["val_loss"] is None and h["train_loss"] > 0 for f in record["folds"] for h in f["history"])


# --- 5. kept manifest columns -----------------------------------------------------------------
def test_a_column_kept_by_a_later_run_is_read_and_patient_fallback_warns(synthetic_svs_05, synthetic_svs_025, tmp_path):
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"slide_id": "a", "path": str(synthetic_svs_05), "case_id": "P1"},
            {"slide_id": "b", "path": str(synthetic_svs_025), "case_id": "P1"},
        ],
    )
    store = FeatureStore(str(tmp_path / "store"))
    embed(tmp_path, write_manifest(tmp_path / "a.csv", [{"slide_id": "a", "path": str(synthetic_svs_05)}]))
    _, report = embed(tmp_path, manifest, keep_columns=["case_id"])  # slide a is skipped: committed
    assert report.slides_skipped == 1 and report.per_model[MODEL]["ok"] == 1

    index = index_bags(store, MODEL)
    assert index.column("case_id") == {"a": None, "b": "P1"}
    assert "case_id" in store.dataset(MODEL).schema.names
    labels = pa.table({"slide_id": ["a", "b"], "label": [0, 1]})
    with pytest.warns(PatientFallbackWarning, match=r"1 of 2 .*: a\b"):
        joined = join_labels(index, labels)
    assert joined.patients == {"a": "a", "b": "P1"}
    # a case_id in the labels table fills the gap, without warning
    with_case = labels.append_column("case_id", pa.array(["P1", "P1"]))
    assert join_labels(index, with_case).patients == {"a": "P1", "b": "P1"}


# --- 6. export never mixes models ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["trident-h5", "pt"])
def test_export_refuses_another_models_files_unless_overwrite(fmt, tmp_path):
    store = ensure_store(tmp_path / "store", "model-a", 8)
    ensure_store(tmp_path / "store", "model-b", 8)
    rng = np.random.default_rng(0)
    for model in ("model-a", "model-b"):
        for slide_id in ("s1", "s2"):
            commit_slide(store, model, slide_id, grid(6), rng.normal(size=(6, 8)), "case")
    out = tmp_path / "feats"
    assert sorted(export_store(store, "model-a", fmt, str(out)).written) == ["s1", "s2"]
    assert export_store(store, "model-a", fmt, str(out)).skipped == ["s1", "s2"]  # a re-run skips its own files
    cli = [
        sys.executable,
        "-m",
        "pathray.cli",
        "export",
        "--store",
        str(tmp_path / "store"),
        "--model",
        "model-b",
        "--format",
        fmt,
        "--out",
        str(out),
    ]
    refused = subprocess.run(
        cli, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert refused.returncode == 2 and "model-a" in refused.stderr and "--overwrite" in refused.stderr
    with pytest.raises(ExportConflictError):
        export_store(store, "model-b", fmt, str(out))
    report = export_store(store, "model-b", fmt, str(out), overwrite=True)
    assert sorted(report.written) == ["s1", "s2"]
    folder, ext = ("h5_files", "h5") if fmt == "trident-h5" else ("pt_files", "pt")
    expected = pq.read_table(tmp_path / "store" / store.commit_record("model-b", "s1").features_path)
    expected = np.stack(expected.column("embedding").to_numpy(zero_copy_only=False))
    if fmt == "trident-h5":
        import h5py

        with h5py.File(out / folder / f"s1.{ext}") as f:
            assert f["features"].attrs["encoder"] == "model-b"
            np.testing.assert_array_equal(f["features"][:], expected)
    else:
        import torch

        np.testing.assert_array_equal(torch.load(out / folder / f"s1.{ext}", weights_only=True).numpy(), expected)


# --- 8. local commits are durable, in order -----------------------------------------------------
COMMIT_SCRIPT = textwrap.dedent("""
    import os
    import sys
    import numpy as np
    import pyarrow as pa
    from pathray.store import CommitRequest, FeatureStore, embeddings_to_arrow, feature_schema, finalize_slide
    store = FeatureStore(sys.argv[1])
    n = 8
    columns = [pa.array(["s1"] * n), pa.array(np.arange(n)), pa.array(np.arange(n) * 448), pa.array(np.zeros(n, np.int64)),
               pa.array(np.full(n, 448.0)), pa.array(np.full(n, 0.5)), pa.array(np.full(n, 224, np.int32)),
               pa.array(np.ones(n, np.float32)), embeddings_to_arrow(np.ones((n, 4), np.float32))]
    store.write_chunk("m", "s1", "c0", pa.Table.from_arrays(columns, schema=feature_schema(4, pa.float32())))
    with open(sys.argv[1] + "-commit-starts", "wb") as marker:  # its fsync marks the start in the trace
        os.fsync(marker.fileno())
    finalize_slide(store, CommitRequest("m", "s1", "C", ("c0",), n, {"path": "/s1.svs"}, {}, "h", "r1"))
""")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_commit_fsyncs_file_then_renames_then_fsyncs_directory_before_the_record(tmp_path):
    """A real system-call trace of one commit: features file fsync -> rename -> directory
    fsync, and only then the commit record, the same way."""
    root = tmp_path.resolve() / "store"
    trace = subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-qq",
            "--seccomp-bpf",
            "-e",
            "trace=fsync,rename,renameat,renameat2",
            sys.executable,
            "-c",
            COMMIT_SCRIPT,
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    if trace.returncode != 0 and "ptrace" in trace.stderr:
        pytest.skip(f"strace cannot trace here: {trace.stderr[-200:]}")
    assert trace.returncode == 0, trace.stderr[-2000:]
    calls = trace.stderr[trace.stderr.index("-commit-starts>") :]
    events = []
    for call, args in re.findall(r"\b(fsync|rename|renameat2?)\((.*?)\)\s+= 0", calls):
        paths = re.findall(r"<([^>]+)>|\"([^\"]+)\"", args)
        named = [a or b for a, b in paths]
        events.append(("fsync", named[0]) if call == "fsync" else ("rename", named[-1]))
    features = str(root / "features/model=m/cohort=C/s1.parquet")
    record = str(root / "_commits/model=m/s1.json")
    want = [
        ("fsync-tmp", features),
        ("rename", features),
        ("fsync", os.path.dirname(features)),
        ("fsync-tmp", record),
        ("rename", record),
        ("fsync", os.path.dirname(record)),
    ]
    positions = []
    for kind, path in want:
        if kind == "fsync-tmp":
            head, name = os.path.split(path)
            match = [i for i, (c, p) in enumerate(events) if c == "fsync" and p.startswith(f"{head}/.{name}.tmp-")]
        else:
            match = [i for i, e in enumerate(events) if e == (kind, path)]
        assert match, f"no {kind} of {path} in {events}"
        positions.append(match[0])
    assert positions == sorted(positions), events
    # the directories a commit created are on disk too: their parents were fsync-ed before the record
    assert ("fsync", str(root / "_commits")) in events[: positions[4]]


@pytest.mark.s3
@pytest.mark.slow  # starts the S3 server if no other test did
def test_resume_and_stale_copies_on_s3(s3_server, s3_bucket, synthetic_svs_05, synthetic_svs_025, tmp_path):
    """Issues 2 and 3 with the store on S3: commit records read in one batch, the stale copy
    of a killed run found by listing the cohort prefixes and deleted."""
    out = f"s3://{s3_bucket}/integrity"
    raw = dict(out=out, storage_options=s3_server.storage_options)

    def run(rows: list[dict]):
        manifest = write_manifest(tmp_path / f"m{len(list(tmp_path.glob('m*.csv')))}.csv", rows)
        return embed(tmp_path, manifest, **raw)[1]

    run([{"slide_id": "s", "path": str(synthetic_svs_05), "cohort": "A"}])
    store = FeatureStore(out, s3_server.storage_options)
    store.fs.rm(store.commit_path(MODEL, "s"))  # killed before its record
    assert run([{"slide_id": "s", "path": str(synthetic_svs_05), "cohort": "B"}]).per_model[MODEL]["ok"] == 1
    store.fs.invalidate_cache()
    assert [p.rsplit("/", 2)[-2] for p in store.fs.find(store.path("features"))] == ["cohort=B"]
    assert set(store.dataset(MODEL).to_table().column("cohort").to_pylist()) == {"B"}
    conflict = run([{"slide_id": "s", "path": str(synthetic_svs_025), "cohort": "B"}])
    assert conflict.per_model[MODEL]["error"] == 1 and conflict.slides_skipped == 0
    assert [e["error_type"] for e in store.errors().to_pylist()] == ["slide_id_conflict"]
    assert run([{"slide_id": "s", "path": str(synthetic_svs_05), "cohort": "B"}]).slides_skipped == 1
