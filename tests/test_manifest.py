import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathray.errors import ManifestError, UnsafeIdError
from pathray.manifest import SlideEntry, check_safe_name, read_manifest


def test_csv_defaults_overrides_and_extra_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "path,slide_id,mpp,cohort,case_id,label\n/data/a.svs,,0.25,tcga,C1,tumor\ns3://b/x/b.ndpi,B,,,C2,normal\n"
    )
    a, b = read_manifest(str(path))
    assert a == SlideEntry("a", "/data/a.svs", 0.25, "tcga", {"case_id": "C1", "label": "tumor"}, 1)
    assert (b.slide_id, b.path, b.mpp, b.cohort, b.row) == ("B", "s3://b/x/b.ndpi", None, None, 2)


@pytest.mark.parametrize("fmt", ["tsv", "parquet", "jsonl"])
def test_other_formats(tmp_path, fmt):
    rows = [
        {"path": "/d/s1.svs", "slide_id": None, "mpp": 0.5, "grade": 3},
        {"path": "file:///d/s2.tiff", "slide_id": "two", "mpp": None, "grade": 1},
    ]
    path = tmp_path / f"m.{fmt}"
    if fmt == "tsv":
        path.write_text("path\tslide_id\tmpp\tgrade\n/d/s1.svs\t\t0.5\t3\nfile:///d/s2.tiff\ttwo\t\t1\n")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    entries = read_manifest(str(path))
    assert [e.slide_id for e in entries] == ["s1", "two"]
    assert entries[0].mpp == 0.5 and entries[1].mpp is None
    assert str(entries[0].extra["grade"]) == "3"


def test_all_problems_reported_with_row_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "slide_id,path,cohort,mpp\n"
        "ok,/a.svs,c,\n"
        "ok,/b.svs,c,\n"  # duplicate
        "../x,/c.svs,c,\n"  # unsafe id
        "d,,c,\n"  # empty path
        ".hidden,/e.svs,c,\n"
        "f,/f.svs,a/b,\n"  # unsafe cohort
        "g,/g.svs,c,abc\n"  # bad mpp
        f"{'x' * 201},/h.svs,c,\n"
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(str(path))
    problems = info.value.problems
    assert len(problems) == 7, problems
    for row, word in [
        (2, "duplicate"),
        (3, ".."),
        (4, "empty path"),
        (5, "starts with '.'"),
        (6, "cohort"),
        (7, "mpp"),
        (8, "200"),
    ]:
        assert any(p.startswith(f"row {row}:") and word in p for p in problems), (row, problems)
    assert info.value.error_type == "manifest_invalid"


def test_unreadable_and_empty_manifests(tmp_path):
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("path,slide_id\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(str(tmp_path / "empty.csv"))
    (tmp_path / "bad.jsonl").write_text('{"path": "/a"}\n{not json\n')
    with pytest.raises(ManifestError, match="line 2"):
        read_manifest(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nopath.csv").write_text("slide_id\na\n")
    with pytest.raises(ManifestError, match="no 'path' column"):
        read_manifest(str(tmp_path / "nopath.csv"))


def test_relative_paths_are_relative_to_the_manifest(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "m.csv"
    path.write_text("path\nslides/a.svs\n/abs/b.svs\n")
    monkeypatch.chdir(tmp_path)
    a, b = read_manifest("sub/m.csv")
    assert a.path == str(tmp_path / "sub" / "slides" / "a.svs") and b.path == "/abs/b.svs"


def test_missing_slide_files_are_not_manifest_errors(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path\n/definitely/not/here.svs\n")
    assert read_manifest(str(path))[0].slide_id == "here"


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "..", "a..b", ".x", "_x", "a\x00b", "tab\there", "x" * 201])
def test_check_safe_name_rejects(bad):
    with pytest.raises(UnsafeIdError):
        check_safe_name(bad, "slide_id")


@pytest.mark.parametrize("good", ["TCGA-AA-0001-01Z-00-DX1.5FA3", "slide 1", "a.b", "x" * 200, "ünï"])
def test_check_safe_name_accepts(good):
    check_safe_name(good, "slide_id")
