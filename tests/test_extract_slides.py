"""Slides through openslide: discovery, resolution metadata, target resolution, pyramid level plan."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from bench._slides import make_slide_image, write_aperio_svs, write_pyramidal_tiff  # noqa: E402
from umeml.client.extract.grid import plan_read  # noqa: E402
from umeml.client.extract.slides import (  # noqa: E402
    Slide,
    SlideError,
    SlideResolution,
    discover_slides,
    open_slide,
    resolve_target,
)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    img = make_slide_image(1024, 768, [(256, 256, 512, 256)])
    return {
        "svs": write_aperio_svs(d / "a.svs", img, mpp=0.25, app_mag=40, downsamples=(1, 4)),
        "tif": write_pyramidal_tiff(d / "b.tif", img, mpp=0.25, downsamples=(1, 2, 4)),
        "nompp": write_pyramidal_tiff(d / "c.tiff", img, mpp=None, downsamples=(1, 2)),
        "dir": d,
    }


def test_aperio_svs_metadata(slides):
    with open_slide(slides["svs"]) as s:
        assert s.vendor == "aperio"
        assert s.dimensions == (1024, 768)
        assert s.level_downsamples == (1.0, 4.0)
        assert s.resolution == SlideResolution(mpp=0.25, magnification=40.0, mpp_source="metadata")
        tile = s.read_rgb((300, 300), 0, (16, 16))
        assert tile.shape == (16, 16, 3) and tile.dtype == np.uint8
        assert int(tile.max(-1).astype(int).mean() - tile.min(-1).astype(int).mean()) > 40  # tissue is saturated
    assert s._osr is None  # closed by the context manager


def test_tiff_resolution_tags_and_missing_mpp(slides):
    with open_slide(slides["tif"]) as s:
        assert s.vendor == "generic-tiff"
        assert s.level_count == 3
        assert s.resolution.mpp == pytest.approx(0.25)
        assert s.resolution.magnification is None
    with open_slide(slides["nompp"]) as s:
        assert s.resolution == SlideResolution(mpp=None, magnification=None, mpp_source="none")
    with open_slide(slides["nompp"], assume_mpp=0.5) as s:
        assert s.resolution == SlideResolution(mpp=0.5, magnification=None, mpp_source="assumed")
    with open_slide(slides["tif"], assume_mpp=0.5) as s:
        assert s.resolution.mpp == pytest.approx(0.25)  # metadata wins over an assumption


def test_resolve_target_rules(slides):
    res = SlideResolution(mpp=0.25, magnification=40.0, mpp_source="metadata")
    t = resolve_target(res, "x", mpp=0.5)
    assert (t.downsample, t.mpp, t.magnification) == (2.0, 0.5, 20.0)
    t = resolve_target(res, "x", magnification=20)
    assert (t.downsample, t.mpp, t.magnification) == (2.0, 0.5, 20.0)
    # pixel size only: magnification by the 20x = 0.5 um convention
    t = resolve_target(SlideResolution(0.25, None, "metadata"), "x", magnification=10)
    assert t.downsample == pytest.approx(4.0) and t.mpp == pytest.approx(1.0)
    # objective power only: magnification works, mpp does not
    t = resolve_target(SlideResolution(None, 40.0, "none"), "x", magnification=20)
    assert t.downsample == 2.0 and t.mpp is None
    with pytest.raises(SlideError, match="--assume-mpp.*--magnification"):
        resolve_target(SlideResolution(None, 40.0, "none"), "s.tif", mpp=0.5)
    with pytest.raises(SlideError, match=r"s\.tif: the slide has no pixel size"):
        resolve_target(SlideResolution(None, None, "none"), "s.tif", mpp=0.5)
    with pytest.raises(SlideError, match="neither"):
        resolve_target(SlideResolution(None, None, "none"), "s.tif", magnification=20)


def test_plan_read_picks_level_and_resize(slides):
    with open_slide(slides["tif"]) as s:  # levels 1, 2, 4 at 0.25 um
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.5), 256)
        assert (plan.level, plan.read_size, plan.patch_size_level0, plan.needs_resize) == (1, 256, 512, False)
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.75), 256)  # ds 3: level 1, resize
        assert (plan.level, plan.read_size, plan.patch_size_level0, plan.needs_resize) == (1, 384, 768, True)
    with open_slide(slides["svs"]) as s:  # levels 1, 4: 20x from 40x reads level 0 and halves it
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.5), 224)
        assert (plan.level, plan.read_size, plan.patch_size_level0) == (0, 448, 448)
        plan = plan_read(s, resolve_target(s.resolution, s.path, magnification=10), 64)
        assert (plan.level, plan.read_size, plan.patch_size_level0, plan.needs_resize) == (1, 64, 256, False)


def test_unreadable_files_raise_slide_error(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    with pytest.raises(SlideError, match="broken.svs"):
        open_slide(bad)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_discover_slides(slides, tmp_path):
    found = discover_slides(slides["dir"])
    assert [p.name for p in found] == ["a.svs", "b.tif", "c.tiff"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my slides\n{slides['svs']}\n\n{slides['tif']}  # second\n")
    assert [p.name for p in discover_slides([lst])] == ["a.svs", "b.tif"]
    assert [p.name for p in discover_slides([slides["svs"], slides["dir"]])] == ["a.svs", "b.tif", "c.tiff"]
    lst.write_text("nowhere.svs\n")
    with pytest.raises(SlideError, match="nowhere.svs"):
        discover_slides([lst])


def test_transparent_pixels_get_the_background_colour():
    from PIL import Image

    class FakeOsr:
        def read_region(self, location, level, size):
            rgba = np.zeros((size[1], size[0], 4), np.uint8)
            rgba[0, 0] = (10, 20, 30, 255)  # one opaque pixel, the rest outside the scan
            return Image.fromarray(rgba, "RGBA")

    slide = Slide.__new__(Slide)
    slide.path, slide._osr, slide.background = "fake", FakeOsr(), (255, 255, 255)
    out = slide.read_rgb((0, 0), 0, (2, 2))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[1, 1].tolist() == [255, 255, 255]
