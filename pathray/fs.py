"""One place that turns a path or URI into an fsspec filesystem.

Accepted forms: a plain local path, ``file://...``, or ``s3://bucket/key``. For S3,
``storage_options`` go to :class:`s3fs.S3FileSystem` unchanged (``key``, ``secret``,
``client_kwargs={"endpoint_url": ...}``, ``anon``...). With none given, s3fs/botocore use
the usual AWS sources (environment, ``~/.aws``, instance role); ``AWS_ENDPOINT_URL`` points
them at an S3-compatible server: the store's client, and the slides' too unless they have options of
their own (:func:`slide_storage_options`). Credentials are never logged or written by pathray.

Every S3 client gets :data:`S3_CLIENT_DEFAULTS` merged under the caller's ``config_kwargs``
(the caller's values win): botocore's ``adaptive`` retry mode with up to 8 attempts,
which backs off exponentially with jitter (up to 20 s) on throttling (503 SlowDown),
5xx answers, connection errors and timeouts, and rate-limits the client after
throttling; and finite connect/read timeouts (10 s / 30 s) so a stalled request fails and
is retried instead of hanging. s3fs's own retry loops, which nest (5 x 5 attempts per
GET), are set to one attempt (:data:`S3FS_RETRIES`), so a request that never answers
ends as an error after at most about 8 x 30 s plus back-off.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

S3_CLIENT_DEFAULTS: dict[str, Any] = {
    "retries": {"max_attempts": 8, "mode": "adaptive"},
    "connect_timeout": 10,  # s
    "read_timeout": 30,  # s
}
S3FS_RETRIES = 1  # s3fs's own retry loops (nested twice per GET) off: botocore's above do the retrying


def is_remote(uri: str) -> bool:
    """True for URIs that are not on the local filesystem (currently ``s3://``)."""
    return uri.startswith("s3://")


def split_uri(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` where ``path`` is what that filesystem expects.

    Local paths come back absolute. Unknown schemes raise ``ValueError``.
    """
    if uri.startswith("s3://"):
        import s3fs  # imported lazily: local-only users never pay for botocore

        options = s3_options(storage_options)
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        own = options["config_kwargs"].get("ignore_configured_endpoint_urls")  # see slide_storage_options
        if endpoint and not own and "endpoint_url" not in options.get("client_kwargs", {}):
            options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
        fs = s3fs.S3FileSystem(**options)
        fs.retries = S3FS_RETRIES
        return fs, uri[len("s3://") :]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return fsspec.filesystem("file"), os.path.abspath(uri)


def s3_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``storage_options`` with :data:`S3_CLIENT_DEFAULTS` under its ``config_kwargs``."""
    options = dict(storage_options or {})
    options["config_kwargs"] = {**S3_CLIENT_DEFAULTS, **(options.get("config_kwargs") or {})}
    return options


def slide_storage_options(store: dict[str, Any] | None, slides: dict[str, Any] | None) -> dict[str, Any] | None:
    """The s3fs options slides are read with. ``slides`` None: the store's (one storage).
    Otherwise slides have their own client: ``slides`` as given, and when they name no
    endpoint, AWS's: ``AWS_ENDPOINT_URL`` (and botocore's endpoint settings), which point the
    store's client elsewhere, are ignored for them (botocore ``ignore_configured_endpoint_urls``)."""
    if slides is None:
        return store
    options = dict(slides)
    if not (options.get("client_kwargs") or {}).get("endpoint_url"):
        options["config_kwargs"] = {**(options.get("config_kwargs") or {}), "ignore_configured_endpoint_urls": True}
    return options


def join(root: str, *parts: str) -> str:
    """Join URI/path segments with '/', keeping the scheme of ``root``."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
