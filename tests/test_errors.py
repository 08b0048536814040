"""errors.describe: what a user reads in the error ledger."""

from __future__ import annotations

import pytest

from pathray.errors import StagingError, describe


def test_a_ray_task_error_is_described_by_its_real_cause_without_terminal_codes(ray_cluster):
    import ray

    def _raise(exc):  # defined here so Ray pickles it by value (workers cannot import tests/)
        raise exc

    remote = ray.remote(num_cpus=0.1, max_retries=0)(_raise)
    with pytest.raises(Exception) as staged:
        ray.get(remote.remote(StagingError("cannot copy s3://b/x.svs")))
    with pytest.raises(Exception) as other:
        ray.get(remote.remote(ValueError("\x1b[31mbad\x1b[0m value")))
    assert "RayTaskError" in type(staged.value).__name__
    assert describe(staged.value) == ("staging_failed", "cannot copy s3://b/x.svs")
    assert describe(other.value) == ("unexpected_error", "ValueError: bad value")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("SlowDown", 503, "storage_unavailable"),
        ("ServiceUnavailable", 503, "storage_unavailable"),
        ("InternalError", 500, "storage_unavailable"),
        ("AccessDenied", 403, "slide_access_denied"),
        ("NoSuchKey", 404, "slide_not_found"),
        ("InvalidRange", 416, "slide_unreadable"),
    ],
)
def test_s3_errors_as_s3fs_raises_them_are_classified_by_cause(code, status, expected):
    """Throttling and server errors are ``storage_unavailable`` (retried later), never a
    corrupt slide; s3fs's own translation of botocore's errors is what pathray sees."""
    import botocore.exceptions
    import s3fs.errors

    from pathray.wsi.rangeio import storage_error

    error = botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )
    try:
        try:
            raise error
        except botocore.exceptions.ClientError as exc:
            raise s3fs.errors.translate_boto_error(exc) from None  # as s3fs's _error_wrapper raises it
    except OSError as translated:
        assert describe(storage_error("s3://b/k.svs", translated))[0] == expected


def test_an_unreachable_endpoint_is_storage_unavailable_not_unreadable():
    import botocore.exceptions

    from pathray.wsi.rangeio import storage_error

    exc = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
    assert describe(storage_error("s3://b/k.svs", exc))[0] == "storage_unavailable"
