"""Storage outages: fail fast when an endpoint is down, retry a slide a few times when it is
throttled, stop a run whose slides all fail for want of storage.

Three guards, from the cheapest:

* :func:`check_reachable`: before a run (and a dry run) touches the manifest, the store or
  the slides (:func:`read_reachable`), one listing request per ``s3://`` location through a client that gives up
  quickly (:data:`PROBE_CLIENT`: 2 attempts, 5 s connect / 10 s read timeouts, about 20 s
  at worst). An endpoint that is closed, times out or answers only 503/5xx raises
  :class:`~pathray.errors.StorageUnreachableError` naming the endpoint and the cause, so the
  run stops at once instead of spending the normal client's retries (minutes) on each slide.
  Refusals (access denied, no such bucket) are left to the run, which reports them per slide.
* :func:`with_storage_retries`: a slide whose storage answered "unavailable" after the
  client's own retries is tried again a few times with a growing pause (:data:`SLIDE_RETRIES`).
* :class:`OutageBreaker`: the driver counts slides in a row that failed with
  ``storage_unavailable`` / ``storage_timeout``; at :data:`BREAKER_SLIDES` it raises
  :class:`~pathray.errors.StorageUnreachableError` and the run stops (a re-run resumes).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pathray.errors import StorageTimeoutError, StorageUnavailableError, StorageUnreachableError, is_unavailable
from pathray.fs import is_remote, split_uri

if TYPE_CHECKING:
    from pathray.job.config import JobConfig
    from pathray.manifest import SlideEntry

log = logging.getLogger("pathray")
T = TypeVar("T")

#: botocore settings of the reachability probe: fail within about 20 s on a dead endpoint
PROBE_CLIENT: dict[str, Any] = {
    "retries": {"max_attempts": 2, "mode": "standard"},
    "connect_timeout": 5,
    "read_timeout": 10,
}
SLIDE_RETRIES = 3  # attempts per slide (open/read) when the storage answered "unavailable"
RETRY_BASE_S = 2.0  # pause before the 2nd attempt; doubles for each further one (with jitter)
BREAKER_SLIDES = 5  # slides in a row failing for want of storage that stop the run
RETRYABLE = (StorageUnavailableError.error_type, StorageTimeoutError.error_type)


def endpoint_of(fs: Any, storage_options: dict[str, Any] | None) -> str:
    """The endpoint an s3fs filesystem talks to, for messages."""
    client = getattr(fs, "_s3", None)
    url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    return (
        url
        or ((storage_options or {}).get("client_kwargs") or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the AWS default S3 endpoint"
    )


def check_reachable(uri: str, storage_options: dict[str, Any] | None, role: str) -> None:
    """Raise :class:`StorageUnreachableError` when the S3 endpoint serving ``uri`` cannot be
    reached or only answers throttling/server errors; local paths and refusals pass."""
    if not is_remote(uri):
        return
    options = dict(storage_options or {}, skip_instance_cache=True)
    options["config_kwargs"] = {**(options.get("config_kwargs") or {}), **PROBE_CLIENT}
    fs, path = split_uri(uri, options)
    bucket, _, key = path.partition("/")
    started = time.monotonic()
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except Exception as exc:  # noqa: BLE001 - only an outage stops the run here
        cause = describe_cause(exc)
        if is_unavailable(exc) or "timeout" in cause.lower() or "timed out" in cause.lower():
            raise StorageUnreachableError(
                f"cannot reach the {role} at {endpoint_of(fs, storage_options)} ({uri}): {cause} "
                f"(after {time.monotonic() - started:.0f} s). Nothing was written; check the endpoint "
                "(--s3-endpoint-url / --slide-s3-endpoint-url, AWS_ENDPOINT_URL) and the network, then re-run."
            ) from exc


def describe_cause(exc: BaseException) -> str:
    """``exc`` as ``Type: message``, with the S3 error code and HTTP status of the botocore
    error behind it when there is one (s3fs's own message drops them, e.g. for SlowDown)."""
    text = f"{type(exc).__name__}: {exc}"
    seen: BaseException | None = exc
    for _ in range(6):
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error"):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return f"{text} (S3 {response['Error'].get('Code')}, HTTP {status})"
        if seen is None:
            break
        seen = seen.__cause__ or seen.__context__
    return text


def check_slide_sources(paths: Iterable[str], storage_options: dict[str, Any] | None, most: int = 3) -> None:
    """:func:`check_reachable` on the first slide of each of up to ``most`` buckets."""
    seen: dict[str, str] = {}
    for path in paths:
        bucket = path.split("/")[2] if is_remote(path) else ""
        if bucket and bucket not in seen and len(seen) < most:
            seen[bucket] = path
    for path in seen.values():
        check_reachable(path, storage_options, "slide source")


def read_reachable(config: JobConfig) -> list[SlideEntry]:
    """The manifest's entries, after checking that the manifest, the store and the slides'
    source answer (:func:`check_reachable`): an outage stops the run here, within seconds,
    instead of turning every slide into an error row."""
    from pathray.manifest import read_manifest

    log.info("checking that the manifest %s and the store %s can be reached", config.manifest, config.out)
    check_reachable(config.manifest, config.storage_options, "manifest")
    check_reachable(config.out, config.storage_options, "feature store")
    log.info("reading the manifest %s", config.manifest)
    entries = read_manifest(config.manifest, config.storage_options)
    log.info("%d slides in the manifest; checking that their storage can be reached", len(entries))
    check_slide_sources((e.path for e in entries), config.slide_options)
    return entries


def with_storage_retries(fn: Callable[[], T], attempts: int | None = None, base_s: float | None = None) -> T:
    """``fn()``, called again (at most ``attempts`` times in all, pausing ``base_s``, then
    twice that, ...) while it raises :class:`StorageUnavailableError`. Defaults:
    :data:`SLIDE_RETRIES`, :data:`RETRY_BASE_S` (read at call time)."""
    attempts, base_s = attempts or SLIDE_RETRIES, RETRY_BASE_S if base_s is None else base_s
    for attempt in range(attempts):
        try:
            return fn()
        except StorageUnavailableError as exc:
            if attempt == attempts - 1:
                raise
            pause = base_s * 2**attempt * random.uniform(0.75, 1.25)
            log.warning("storage unavailable, attempt %d/%d; retrying in %.1f s: %s", attempt + 1, attempts, pause, exc)
            time.sleep(pause)
    raise AssertionError("unreachable")  # attempts >= 1


@dataclass
class OutageBreaker:
    """Counts slides in a row that failed for want of storage (``storage_unavailable``,
    ``storage_timeout``); :meth:`record` raises once ``limit`` are reached."""

    limit: int = BREAKER_SLIDES
    _failed: tuple[str, ...] = ()

    def record(self, slide_id: str, error_type: str | None, message: str = "") -> None:
        if error_type not in RETRYABLE:
            self._failed = ()
            return
        if slide_id not in self._failed:
            self._failed = (*self._failed, slide_id)
        if len(self._failed) >= self.limit:
            raise StorageUnreachableError(
                f"stopping the run: the last {len(self._failed)} slides ({', '.join(self._failed)}) all failed for "
                f"want of storage ({error_type}); the last error: {message[:500]}. Nothing more was committed; "
                "re-run once the storage serves again (committed slides are skipped)."
            )
