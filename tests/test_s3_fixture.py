"""The SeaweedFS fixture behaves like S3 for everything pathray does with a feature store."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import s3fs

pytestmark = pytest.mark.s3


def test_server_is_local_and_authenticated(s3_server, s3_bucket):
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert s3_server.process.poll() is None
    opts = s3_server.storage_options
    assert opts["client_kwargs"]["endpoint_url"] == s3_server.endpoint_url
    assert s3_server.env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    bad = s3fs.S3FileSystem(
        key=s3_server.access_key,
        secret="wrong-secret",
        skip_instance_cache=True,
        client_kwargs=opts["client_kwargs"],
    )
    with pytest.raises(PermissionError):
        bad.ls(s3_bucket)


def test_buckets_are_fresh_and_unique(s3_server, s3_bucket):
    fs = s3_server.fs
    assert fs.exists(s3_bucket)
    assert fs.find(s3_bucket) == []


def test_put_get_range_overwrite_delete(s3_server, s3_bucket):
    fs = s3_server.fs
    key = f"{s3_bucket}/slides/a.bin"
    fs.pipe(key, b"0123456789")
    assert fs.cat(key) == b"0123456789"
    assert fs.cat_file(key, start=2, end=5) == b"234"
    with fs.open(key, "rb") as fh:
        fh.seek(7)
        assert fh.read(2) == b"78"
    etag1 = fs.info(key)["ETag"]
    assert etag1 and fs.info(key)["size"] == 10

    fs.pipe(key, b"abc")  # overwrite same key
    assert fs.cat(key) == b"abc"
    assert fs.info(key)["size"] == 3
    assert fs.info(key)["ETag"] != etag1

    fs.rm(key)
    assert not fs.exists(key)


def test_listing_prefixes(s3_server, s3_bucket):
    fs = s3_server.fs
    for k in ("store/model=uni2-h/part-0.parquet", "store/model=virchow2/part-0.parquet", "manifest.csv"):
        fs.pipe(f"{s3_bucket}/{k}", b"x")
    assert sorted(fs.ls(s3_bucket)) == [f"{s3_bucket}/manifest.csv", f"{s3_bucket}/store"]
    assert sorted(fs.ls(f"{s3_bucket}/store")) == [
        f"{s3_bucket}/store/model=uni2-h",
        f"{s3_bucket}/store/model=virchow2",
    ]
    assert len(fs.find(f"{s3_bucket}/store")) == 2
    assert fs.glob(f"{s3_bucket}/store/*/*.parquet") == sorted(fs.find(f"{s3_bucket}/store"))


def test_parquet_roundtrip_through_s3fs(s3_server, s3_bucket):
    fs = s3_server.fs
    table = pa.table({"tile": [0, 1, 2], "emb": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]})
    for model in ("uni2-h", "virchow2"):
        pq.write_table(table, f"{s3_bucket}/store/model={model}/part-0.parquet", filesystem=fs)
    assert pq.read_table(f"{s3_bucket}/store/model=uni2-h/part-0.parquet", filesystem=fs).equals(table)
    dataset = ds.dataset(f"{s3_bucket}/store", filesystem=fs, partitioning="hive", format="parquet")
    out = dataset.to_table().sort_by([("model", "ascending"), ("tile", "ascending")])
    assert out.num_rows == 6
    assert out.column("model").to_pylist() == ["uni2-h"] * 3 + ["virchow2"] * 3


def test_arrow_native_s3_filesystem(s3_server, s3_bucket):
    pq.write_table(pa.table({"x": [1, 2]}), f"{s3_bucket}/t.parquet", filesystem=s3_server.fs)
    assert pq.read_table(f"{s3_bucket}/t.parquet", filesystem=s3_server.arrow_fs()).column("x").to_pylist() == [1, 2]


def test_env_reaches_server_from_a_subprocess(s3_server, s3_bucket):
    """A fresh process with only ``env`` (as a Ray worker gets it) reads and writes the bucket."""
    s3_server.fs.pipe(f"{s3_bucket}/in.txt", b"hello")
    code = (
        "import s3fs, sys; fs = s3fs.S3FileSystem(); b = sys.argv[1];"
        "fs.pipe(b + '/out.txt', fs.cat(b + '/in.txt') + b'!')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env)
    subprocess.run([sys.executable, "-c", code, s3_bucket], env=env, check=True, timeout=120)
    assert s3_server.fs.cat(f"{s3_bucket}/out.txt") == b"hello!"
