"""S3 client defaults: retries with back-off and finite timeouts, the caller's values winning."""

from pathray.fs import S3_CLIENT_DEFAULTS, S3FS_RETRIES, s3_options, split_uri


def test_retry_and_timeout_defaults_merge_under_the_callers_config():
    assert s3_options(None)["config_kwargs"] == S3_CLIENT_DEFAULTS
    assert S3_CLIENT_DEFAULTS["retries"]["mode"] == "adaptive"
    mine = {"key": "k", "config_kwargs": {"read_timeout": 5, "retries": {"max_attempts": 2}}}
    merged = s3_options(mine)
    assert merged["config_kwargs"] == {**S3_CLIENT_DEFAULTS, "read_timeout": 5, "retries": {"max_attempts": 2}}
    assert mine["config_kwargs"] == {"read_timeout": 5, "retries": {"max_attempts": 2}}  # caller's dict untouched


def test_s3_filesystems_get_the_defaults():
    fs, path = split_uri(
        "s3://bucket/key.svs",
        {
            "key": "k",
            "secret": "s",
            "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        },
    )
    assert path == "bucket/key.svs" and fs.retries == S3FS_RETRIES
    assert fs.config_kwargs["retries"] == S3_CLIENT_DEFAULTS["retries"]
    assert fs.config_kwargs["read_timeout"] == S3_CLIENT_DEFAULTS["read_timeout"]
