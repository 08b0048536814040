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
