"""Error taxonomy shared by every stage.

Every failure that concerns one slide (or one slide under one model) is raised as a
:class:`PathrayError` subclass whose ``error_type`` is a stable, documented string. The
pipeline catches these per slide and records them as rows
``(slide_id, stage, error_type, message)``; it never lets one slide stop the others.
"""

from __future__ import annotations

import re


class PathrayError(Exception):
    """Base class. ``error_type`` is the stable name written to status/error tables."""

    error_type = "pathray_error"


# --- manifest -------------------------------------------------------------------------
class ManifestError(PathrayError):
    """The manifest as a whole cannot be used. ``problems`` lists every problem found,
    each prefixed with its 1-based data row number where it concerns one row."""

    error_type = "manifest_invalid"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid manifest:\n  " + "\n  ".join(self.problems))


class UnsafeIdError(PathrayError):
    """A slide id or cohort cannot be used as a file or partition name."""

    error_type = "unsafe_id"


# --- slides -----------------------------------------------------------------------------
class SlideError(PathrayError):
    """Base for per-slide failures."""

    error_type = "slide_error"


class SlideNotFoundError(SlideError):
    error_type = "slide_not_found"


class SlideUnreadableError(SlideError):
    """The file exists but is not a slide OpenSlide can read (corrupt, truncated, wrong format)."""

    error_type = "slide_unreadable"


class SlideAccessDeniedError(SlideError):
    """The storage refused to serve the slide object (credentials or bucket policy)."""

    error_type = "slide_access_denied"


class StorageTimeoutError(SlideError):
    """A storage request for the slide kept timing out after the client's retries."""

    error_type = "storage_timeout"


class StorageUnavailableError(SlideError):
    """The storage did not serve the slide for now: throttled (503 SlowDown, which s3fs
    raises as ``OSError(EBUSY)``), a server error (S3 ``InternalError``, 5xx) or an endpoint
    that cannot be reached. Not a fact about the slide: nothing is committed for it and the
    next run retries it. See :func:`is_unavailable`."""

    error_type = "storage_unavailable"


class StorageUnreachableError(PathrayError):
    """The slide source, manifest or store cannot be reached at all (endpoint down, every
    request throttled): the run stops instead of turning every slide into an error row."""

    error_type = "storage_unreachable"


class MppMissingError(SlideError):
    """Neither the slide nor the manifest's ``mpp`` column gives microns per pixel."""

    error_type = "mpp_missing"


class MppImplausibleError(SlideError):
    """Microns per pixel outside the plausible range for whole-slide images."""

    error_type = "mpp_implausible"


class StagingError(SlideError):
    """A remote slide could not be copied to local scratch (network, size limit, missing object)."""

    error_type = "staging_failed"


# --- encoders -------------------------------------------------------------------------
class EncoderError(PathrayError):
    error_type = "encoder_error"


class NonFiniteEmbeddingError(EncoderError):
    """An encoder returned NaN or infinite values (e.g. fp16 overflow); they are never stored."""

    error_type = "non_finite_embedding"


class UnknownModelError(EncoderError, KeyError):
    error_type = "unknown_model"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else self.error_type


class WeightsUnavailableError(EncoderError):
    """Weights missing, gated without access, or unreachable (no network)."""

    error_type = "weights_unavailable"


class WeightsMismatchError(EncoderError):
    """A checkpoint does not fit the architecture (missing/unexpected keys, wrong shapes)."""

    error_type = "weights_mismatch"


class WeightsCorruptError(EncoderError):
    """A checkpoint file cannot be parsed."""

    error_type = "weights_corrupt"


# --- store ------------------------------------------------------------------------------
class StoreError(PathrayError):
    error_type = "store_error"


class LeaseLostError(StoreError):
    """This run's store lease was taken over (or could not be renewed before it expired):
    another driver may own the store, so this one must not commit anything more."""

    error_type = "lease_lost"


class StoreConfigMismatchError(StoreError):
    """An existing store was written with a different tiling/model config."""

    error_type = "store_config_mismatch"


class StoreBusyError(StoreError):
    """Another live driver holds the store's run lease."""

    error_type = "store_busy"


class CommitMismatchError(StoreError):
    """A (slide, model)'s staged chunks do not hold exactly the planned tiles."""

    error_type = "commit_mismatch"


class SlideIdConflictError(StoreError):
    """A manifest row's slide id is already committed in the store for another slide (another
    path or cohort), e.g. two cohorts' ``slide1.svs`` under the default id (the file stem)."""

    error_type = "slide_id_conflict"


class FeaturesUnreadableError(StoreError):
    """A committed features file cannot be read back whole (corrupt, truncated, missing,
    or not the rows its commit record promises)."""

    error_type = "features_unreadable"


class CoordsMissingError(StoreError):
    """An imported features file has no tile coordinates: no ``coords`` dataset, or for
    ``pt`` files no matching h5 in ``--coords-dir``, or none of the attributes that give
    the tile's size and resolution."""

    error_type = "coords_missing"


class ImportMismatchError(StoreError):
    """An imported slide does not fit its model in the store: another embedding width,
    another tiling, or a features/coords row count that differ."""

    error_type = "import_mismatch"


class AggregatorError(PathrayError):
    """A slide aggregator failed on one slide (or could not be built)."""

    error_type = "aggregator_error"


class SlideTooLargeForEncoderError(AggregatorError):
    """A slide has more tiles than a slide encoder can hold in the memory free on its device;
    refused before any work, so the actor survives. ``n_tiles`` and ``limit_tiles`` say by how much."""

    error_type = "slide_too_large_for_encoder"

    def __init__(self, message: str, *, n_tiles: int, limit_tiles: int):
        super().__init__(message)
        self.n_tiles, self.limit_tiles = n_tiles, limit_tiles


UNEXPECTED = "unexpected_error"
#: words in an exception (or its causes) that mean "the storage is not serving now", not
#: "this object is bad": S3 error codes, botocore's connection errors, HTTP 5xx reasons
_UNAVAILABLE_MARKERS = (
    "SlowDown",
    "ServiceUnavailable",
    "Service Unavailable",
    "InternalError",
    "EndpointConnectionError",
    "Could not connect to the endpoint",
    "ConnectionClosedError",
    "Connection was closed",
    "Connection refused",
    "RequestLimitExceeded",
    "Throttling",
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def describe(exc: BaseException) -> tuple[str, str]:
    """``(error_type, message)`` for a status/error row. pathray's own errors keep their
    stable ``error_type``; anything else (a bug, an unforeseen library error) is
    ``unexpected_error`` with the exception's class name leading the message. A Ray task
    error is unwrapped to the exception raised inside the task, and terminal colour codes
    are stripped from every message."""
    exc = _root_cause(exc)
    if isinstance(exc, PathrayError):
        return exc.error_type, _ANSI.sub("", str(exc))
    return UNEXPECTED, _ANSI.sub("", f"{type(exc).__name__}: {exc}")


#: the most characters of an error message that a status/error row or a run report keeps
MAX_MESSAGE_CHARS = 2000


def cap_message(message: str) -> str:
    """``message`` cut to its first :data:`MAX_MESSAGE_CHARS` characters: the form every status row,
    error row and run report stores (a stack of chained errors can run to megabytes)."""
    return message[:MAX_MESSAGE_CHARS]


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) says the storage is throttling,
    failing server-side or unreachable, i.e. a retry later may succeed: ``OSError(EBUSY)``
    (s3fs's 503 SlowDown), ``ConnectionError``, botocore's connection errors, S3
    ``SlowDown``/``ServiceUnavailable``/``InternalError``."""
    import errno

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, StorageUnavailableError | StorageUnreachableError | ConnectionError):
            return True
        if isinstance(seen, OSError) and seen.errno == errno.EBUSY:
            return True
        text = f"{type(seen).__name__}: {seen}"
        if any(marker in text for marker in _UNAVAILABLE_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _root_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, for a ``RayTaskError`` (which wraps it with a remote
    traceback); ``exc`` itself otherwise."""
    for _ in range(8):  # nested task errors: a task that called a task
        cause = getattr(exc, "cause", None)
        if "RayTaskError" not in type(exc).__name__ or not isinstance(cause, BaseException):
            return exc
        exc = cause
    return exc
