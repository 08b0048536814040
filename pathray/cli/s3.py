"""The S3 options every subcommand takes, and how they become s3fs storage options.

The manifest, the store and other outputs share one client (``--s3-endpoint-url``, else
``AWS_ENDPOINT_URL`` or AWS). Slides get their own as soon as any slide option is given
(``--slide-s3-endpoint-url``, ``--s3-anonymous``, or ``slide_storage_options`` in a job
YAML): then they are read from that endpoint, or AWS's when none is named, never from the
store's (see :func:`pathray.fs.slide_storage_options`). So a store on a local SeaweedFS
and IDC's public slides on AWS work in one run.
"""

from __future__ import annotations

import argparse
from typing import Any

from pathray.fs import slide_storage_options


def add_s3_options(parser: argparse.ArgumentParser, slides: bool = True) -> None:
    """``--s3-endpoint-url``; with ``slides``, also ``--slide-s3-endpoint-url`` and ``--s3-anonymous``."""
    parser.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint of the manifest, the store and outputs (else AWS_ENDPOINT_URL / AWS)",
    )
    if slides:
        parser.add_argument(
            "--slide-s3-endpoint-url",
            help="S3-compatible endpoint of s3:// slides, when they live elsewhere than the store "
            "(default: the store's endpoint, or AWS with --s3-anonymous)",
        )
        parser.add_argument(
            "--s3-anonymous",
            action="store_true",
            help="read slides with unsigned S3 requests (public buckets such as IDC's idc-open-data), "
            "from AWS unless --slide-s3-endpoint-url; the manifest and the store keep the usual "
            "credentials and endpoint",
        )


def apply_s3_args(args: argparse.Namespace, raw: dict[str, Any]) -> None:
    """Set ``raw["storage_options"]`` / ``raw["slide_storage_options"]`` (a job config dict,
    possibly from YAML) from the parsed S3 options; slide options never copy the store's."""
    if args.s3_endpoint_url:
        raw["storage_options"] = _with_endpoint(raw.get("storage_options"), args.s3_endpoint_url)
    slide_endpoint, anonymous = getattr(args, "slide_s3_endpoint_url", None), getattr(args, "s3_anonymous", False)
    if slide_endpoint or anonymous:
        slides = dict(raw.get("slide_storage_options") or {})
        if slide_endpoint:
            slides = _with_endpoint(slides, slide_endpoint)
        if anonymous:
            slides["anon"] = True
        raw["slide_storage_options"] = slides


def s3_options_from_args(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(store options, slide options)`` for s3fs, from the parsed S3 options alone."""
    raw: dict[str, Any] = {}
    apply_s3_args(args, raw)
    store = raw.get("storage_options")
    return store, slide_storage_options(store, raw.get("slide_storage_options"))


def _with_endpoint(options: dict[str, Any] | None, endpoint: str) -> dict[str, Any]:
    options = dict(options or {})
    options["client_kwargs"] = {**(options.get("client_kwargs") or {}), "endpoint_url": endpoint}
    return options
