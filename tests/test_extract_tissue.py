"""Tissue segmentation and the patch grid on synthetic images with known tissue."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from bench._slides import BACKGROUND, make_slide_image, tissue_patch_count  # noqa: E402
from umeml.client.extract.grid import tissue_grid  # noqa: E402
from umeml.client.extract.tissue import TissueParams, otsu_threshold, saturation, segment_tissue  # noqa: E402


def test_otsu_splits_two_modes():
    values = np.concatenate([np.full(500, 10), np.full(300, 120)]).astype(np.uint8)
    t = otsu_threshold(values)
    assert 10 <= t < 120
    assert otsu_threshold(np.zeros(0, np.uint8)) == 0


def test_saturation_of_grey_and_colour():
    rgb = np.array([[[200, 200, 200], [200, 100, 100], [0, 0, 0]]], np.uint8)
    assert saturation(rgb).tolist() == [[0, 127, 0]]


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_grid_count_matches_known_tissue_area(scale):
    patch = 64
    rects = [(64, 64, 256, 128), (448, 320, 128, 192)]  # 8 + 6 patches, aligned to the grid
    img = make_slide_image(640, 576, rects)
    # the mask is computed on a thumbnail `scale` times smaller than "level 0"
    thumb = img[:: int(scale), :: int(scale)]
    tissue = segment_tissue(thumb, (scale, scale), patch)
    coords = tissue_grid(tissue, (640, 576), patch, min_tissue_fraction=0.5)
    assert len(coords) == tissue_patch_count(rects, patch) == 14
    assert coords.dtype == np.int64 and coords.shape == (14, 2)
    # every patch lies inside a tissue rectangle and inside the image
    for x, y in coords:
        assert any(rx <= x and x + patch <= rx + rw and ry <= y and y + patch <= ry + rh for rx, ry, rw, rh in rects)
    assert coords[:, 0].max() + patch <= 640 and coords[:, 1].max() + patch <= 576
    # ordered by row, then column
    assert coords.tolist() == sorted(coords.tolist(), key=lambda c: (c[1], c[0]))


def test_small_holes_filled_large_holes_kept_specks_dropped():
    patch = 32
    img = make_slide_image(512, 512, [(32, 32, 448, 448)], seed=1)
    img[96:112, 96:112] = BACKGROUND  # a small hole (a quarter patch): filled
    img[224:320, 224:320] = BACKGROUND  # a 3 x 3 patch hole (9 patch areas): stays a hole
    tissue = segment_tissue(img, (1.0, 1.0), patch, TissueParams(max_hole_area=4.0))
    assert tissue.mask[100:108, 100:108].all()
    assert not tissue.mask[240:300, 240:300].any()
    coords = tissue_grid(tissue, (512, 512), patch)
    assert len(coords) == 14 * 14 - 9

    speck = make_slide_image(512, 512, [(64, 64, 256, 256), (400, 400, 12, 12)], seed=2)
    tissue = segment_tissue(speck, (1.0, 1.0), patch)  # min_area 0.5 patch: the 12 x 12 speck goes
    assert not tissue.mask[400:412, 400:412].any()
    assert tissue.mask[100:300, 100:300].all()


def test_blank_slide_has_no_tissue():
    img = make_slide_image(256, 256, [])
    tissue = segment_tissue(img, (1.0, 1.0), 32)
    assert not tissue.mask.any()
    assert tissue.threshold >= TissueParams().min_saturation
    assert len(tissue_grid(tissue, (256, 256), 32)) == 0


def test_min_tissue_fraction_controls_edge_patches():
    patch = 64
    img = make_slide_image(256, 256, [(0, 0, 168, 64)])  # 2.6 patches wide
    tissue = segment_tissue(img, (1.0, 1.0), patch)
    assert len(tissue_grid(tissue, (256, 256), patch, min_tissue_fraction=0.5)) == 3
    assert len(tissue_grid(tissue, (256, 256), patch, min_tissue_fraction=0.9)) == 2
    with pytest.raises(ValueError):
        tissue_grid(tissue, (256, 256), patch, min_tissue_fraction=0.0)
