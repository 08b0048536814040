import numpy as np
import pytest

from pathray.demo.synthetic import synthetic_image
from pathray.errors import MppImplausibleError, MppMissingError, PathrayError
from pathray.wsi.mpp import resolve_mpp
from pathray.wsi.slide import open_slide


def test_synthetic_slide_metadata_and_pixels(synthetic_svs_025):
    with open_slide(str(synthetic_svs_025)) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "openslide"
        assert slide.vendor == "aperio"
        assert slide.dimensions == (4096, 3072)
        assert slide.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
        assert slide.level_downsamples == (1.0, 4.0, 16.0)
        assert slide.size_bytes > 0 and slide.etag is None
        region = slide.read_region(500, 600, 0, 300, 200)
        truth = synthetic_image(4096, 3072, synthetic_svs_025.tissue_rects)[600:800, 500:800]
        assert region.dtype == np.uint8 and region.shape == (200, 300, 3)
        assert np.abs(region.astype(int) - truth).mean() < 2.0  # JPEG q95


@pytest.mark.parametrize(
    "level, window",
    [(0, (440, 440, 600, 300)), (1, (1024, 2048, 300, 200)), (2, (0, 0, 256, 192)), (0, (3900, 2900, 400, 400))],
)
def test_direct_tiff_reads_equal_openslide(synthetic_svs_025, level, window):
    """The fast path decodes the TIFF's JPEG tiles itself; it must give OpenSlide's pixels."""
    with open_slide(str(synthetic_svs_025)) as slide:
        assert slide.has_direct_reads(level)
        fast = slide.read_region(*window[:2], level, *window[2:])
        reference = slide.read_region_openslide(*window[:2], level, *window[2:])
        assert np.array_equal(fast, reference)


def test_direct_reads_equal_openslide_on_real_slide(cmu_slide):
    with open_slide(str(cmu_slide)) as slide:
        assert slide.mpp == pytest.approx(0.499) and slide.has_direct_reads(0)
        fast = slide.read_region(1000, 1500, 0, 700, 500)
        assert np.abs(fast.astype(int) - slide.read_region_openslide(1000, 1500, 0, 700, 500)).max() <= 1


def test_outside_the_slide_is_white(synthetic_svs_05):
    with open_slide(str(synthetic_svs_05)) as slide:
        assert (slide.read_region(2048, 1536, 0, 64, 64) == 255).all()
        assert (slide.read_region_openslide(2048, 1536, 0, 64, 64) == 255).all()


def test_mpp_override_wins_and_fixes_missing(synthetic_svs_no_mpp, synthetic_svs_05):
    with pytest.raises(MppMissingError, match="'mpp' column"):
        open_slide(str(synthetic_svs_no_mpp))
    with open_slide(str(synthetic_svs_no_mpp), mpp_override=0.5) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.5, "manifest")
    with open_slide(str(synthetic_svs_05), mpp_override=0.52) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.52, "manifest")
    with pytest.raises(MppImplausibleError):
        open_slide(str(synthetic_svs_05), mpp_override=50)


def test_mpp_resolution_order():
    assert resolve_mpp(
        {
            "openslide.mpp-x": "0.25",
            "openslide.mpp-y": "0.25",
            "tiff.ResolutionUnit": "centimeter",
            "tiff.XResolution": "20000",
        }
    ) == (0.25, "openslide")
    assert resolve_mpp(
        {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "20000", "tiff.YResolution": "20000"}
    ) == (0.5, "tiff_resolution")
    assert resolve_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"}) == (0.25, "tiff_resolution")
    with pytest.raises(MppMissingError):  # unitless resolution, objective power: never used
        resolve_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1", "openslide.objective-power": "40"})
    with pytest.raises(MppImplausibleError):
        resolve_mpp({"openslide.mpp-x": "0.01", "openslide.mpp-y": "0.01"})
    with pytest.raises(MppImplausibleError, match="non-square"):
        resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.5"})


@pytest.mark.parametrize(
    "fixture, error_type",
    [
        ("truncated_svs", "slide_unreadable"),
        ("corrupt_tiles_svs", "slide_unreadable"),
        ("zero_byte_svs", "slide_unreadable"),
        ("png_as_svs", "slide_unreadable"),
        ("missing_svs", "slide_not_found"),
        ("synthetic_svs_no_mpp", "mpp_missing"),
    ],
)
def test_bad_inputs_raise_their_specific_error(request, fixture, error_type):
    with pytest.raises(PathrayError) as info:
        open_slide(str(request.getfixturevalue(fixture)))
    assert info.value.error_type == error_type


def test_file_uri(synthetic_svs_05):
    with open_slide(f"file://{synthetic_svs_05}") as slide:
        assert slide.dimensions == (2048, 1536)
