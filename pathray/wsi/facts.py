"""What the job learns about a slide when it plans it, as one type.

:class:`SlideFacts` travels between the stages as JSON in the chunk rows' ``slide_facts``
column (Arrow has no place for a Python object), and ends in the slide table and the commit
record. Units: ``width``/``height`` level-0 px, ``mpp`` level-0 µm/px.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

#: the facts a commit record keeps (``level_count`` is for the stages only)
COMMIT_FIELDS = ("path", "width", "height", "mpp", "mpp_source", "vendor", "etag", "size_bytes")


@dataclass(frozen=True)
class SlideFacts:
    path: str  # the manifest's URI
    width: int  # level-0 px
    height: int  # level-0 px
    mpp: float  # level-0 µm/px, as used for tiling
    mpp_source: str  # "manifest" | "openslide" | "tiff_resolution"
    vendor: str | None
    etag: str | None  # of the object read (S3 ETag, DICOM SeriesInstanceUID), None for local files
    size_bytes: int | None  # of the object(s) read
    level_count: int

    @classmethod
    def of(cls, slide: Any) -> SlideFacts:
        """The facts of an open :class:`pathray.wsi.slide.Slide`."""
        width, height = slide.dimensions
        return cls(
            slide.uri,
            int(width),
            int(height),
            float(slide.mpp),
            slide.mpp_source,
            slide.vendor,
            slide.etag,
            slide.size_bytes,
            len(slide.level_dimensions),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SlideFacts | None:
        """The facts a chunk row carries; ``None`` for a slide that failed before they were known."""
        raw = json.loads(text or "{}")
        return cls(**raw) if raw else None

    def commit_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COMMIT_FIELDS}


def status_fields(facts: SlideFacts) -> dict[str, Any]:
    """The slide's columns of a status row, by name: the facts a commit record keeps
    (:data:`COMMIT_FIELDS`): ``path`` (the manifest's URI), ``width``/``height`` (level-0 px),
    ``mpp`` (level-0 µm/px), ``mpp_source``, ``vendor``, ``etag``, ``size_bytes``.

    The one mapping from slide facts to status columns: each status table (the job's
    ``slides.parquet``, ``pathray tile``'s) keeps the names its schema has and ignores the rest."""
    return facts.commit_fields()
