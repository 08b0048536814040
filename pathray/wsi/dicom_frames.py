"""DICOM WSI frames as stored tiles: the transfer syntaxes read, fragment items, decoding.

A level's frames are the stored tiles of :mod:`pathray.wsi.tifftiles` (:class:`DicomLevel`);
an encapsulated frame is a run of fragment items whose values are joined (:func:`fragments`)
and decoded with imagecodecs (:func:`decode_frame`; colour: see :mod:`pathray.wsi.dicom`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from pathray.errors import SlideUnreadableError
from pathray.wsi.tifftiles import TiledLevel

ITEM_TAG = 0xE000FFFE  # (FFFE,E000) read as little-endian uint32
SEQ_DELIMITER = 0xE0DDFFFE
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
UNCOMPRESSED = ("1.2.840.10008.1.2.1",)  # Explicit VR Little Endian


class DicomWsiError(SlideUnreadableError):
    """The series is not a DICOM WSI this reader handles (message says why); recorded per
    slide as ``slide_unreadable``."""


@dataclass(frozen=True)
class DicomLevel(TiledLevel):
    """A level's frames as stored tiles for :mod:`pathray.wsi.tifftiles` (``read_window``,
    :class:`~pathray.wsi.tifftiles.BlockLoader`): ``offsets``/``counts`` are each tile's frame
    bytes in the file (fragment items with their tags where ``items``), count 0 = no frame
    (sparse: white; or not located yet, never asked for)."""

    syntax: str = JPEG_BASELINE
    photometric: str = "YBR_FULL_422"
    items: bool = True  # ranges hold fragment items (tags included), not bare codestreams

    def decode_tile(self, data: bytes, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """One frame as RGB uint8 ``(tile_height, tile_width, 3)`` (see the module doc for colour);
        raises SlideUnreadableError."""
        try:
            tile = decode_frame(fragments(data) if self.items else data, self)
        except Exception as exc:  # corrupt data, truncated or mis-split frames
            raise SlideUnreadableError(f"frame of tile {index} cannot be decoded: {type(exc).__name__}: {exc}") from exc
        if tile.shape != (self.tile_height, self.tile_width, 3):
            raise SlideUnreadableError(
                f"frame of tile {index} decodes to {tile.shape}, not one {self.tile_width}x{self.tile_height} RGB frame"
            )
        if out is None:
            return tile
        out[...] = tile
        return out


def fragments(blob: bytes) -> bytes:
    """The concatenated values of the items in ``blob`` (stops at a sequence delimiter)."""
    parts, at = [], 0
    while at + 8 <= len(blob):
        tag, length = struct.unpack_from("<II", blob, at)
        if tag == SEQ_DELIMITER:
            break
        if tag != ITEM_TAG:
            raise DicomWsiError(f"bad fragment item tag {tag:#010x}")
        parts.append(blob[at + 8 : at + 8 + length])
        at += 8 + length
    return b"".join(parts)


def decode_frame(data: bytes, level: DicomLevel) -> np.ndarray:
    """One frame's codestream (or native pixels) as RGB uint8 (see the module doc for colour)."""
    import imagecodecs

    if level.syntax == JPEG_BASELINE:
        colorspace = "RGB" if level.photometric == "RGB" else "YCbCr"
        return imagecodecs.jpeg8_decode(data, colorspace=colorspace, outcolorspace="RGB")
    if level.syntax in JPEG2000:
        return imagecodecs.jpeg2k_decode(data)
    return np.frombuffer(data, np.uint8).reshape(level.tile_height, level.tile_width, 3)
