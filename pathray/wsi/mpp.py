"""A slide's level-0 µm/px from its metadata, or the manifest's override; never guessed.

Resolved in this order:

1. the manifest override (``mpp`` column), when given: users set it to fix bad metadata;
2. ``openslide.mpp-x`` / ``openslide.mpp-y``;
3. TIFF ``XResolution``/``YResolution`` when ``ResolutionUnit`` is centimeter or inch.

It is never guessed from objective power ("40x"). Missing → :class:`MppMissingError`;
outside :data:`MPP_RANGE` µm/px or non-square pixels → :class:`MppImplausibleError`.
"""

from __future__ import annotations

import math

import openslide

from pathray.errors import MppImplausibleError, MppMissingError

MPP_RANGE = (0.05, 20.0)  # plausible level-0 µm/px
_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}


def resolve_mpp(properties: dict[str, str], override: float | None = None) -> tuple[float, str]:
    """Return ``(µm/px, source)`` from an override or slide properties (see module doc)."""
    if override is not None:
        mpp, source = float(override), "manifest"
        _check_plausible(mpp, source)
        return mpp, source
    found = _mpp_from_openslide(properties) or _mpp_from_tiff(properties)
    if found is None:
        raise MppMissingError(
            "the slide has no µm/px metadata (openslide.mpp-x or TIFF resolution in cm/inch); "
            "set it in the manifest's 'mpp' column"
        )
    (mpp_x, mpp_y), source = found
    if abs(mpp_x - mpp_y) > 0.01 * max(mpp_x, mpp_y):
        raise MppImplausibleError(
            f"non-square pixels ({mpp_x:g} x {mpp_y:g} µm/px from {source}); set the manifest's 'mpp' column"
        )
    _check_plausible(mpp_x, source)
    return mpp_x, source


def _check_plausible(mpp: float, source: str) -> None:
    lo, hi = MPP_RANGE
    if not (math.isfinite(mpp) and lo <= mpp <= hi):
        raise MppImplausibleError(
            f"µm/px {mpp:g} from {source} is outside the plausible range [{lo:g}, {hi:g}]; "
            "fix it with the manifest's 'mpp' column"
        )


def _mpp_from_openslide(props: dict[str, str]) -> tuple[tuple[float, float], str] | None:
    x = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
    y = _float(props.get(openslide.PROPERTY_NAME_MPP_Y))
    if x is None and y is None:
        return None
    return (x or y, y or x), "openslide"


def _mpp_from_tiff(props: dict[str, str]) -> tuple[tuple[float, float], str] | None:
    scale = _UNIT_TO_UM.get(props.get("tiff.ResolutionUnit", "").lower())
    x, y = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if scale is None or not x:
        return None
    return (scale / x, scale / (y or x)), "tiff_resolution"


def _float(value: str | None) -> float | None:
    try:
        out = float(value) if value is not None else None
    except ValueError:
        return None
    return out if out and math.isfinite(out) and out > 0 else None
