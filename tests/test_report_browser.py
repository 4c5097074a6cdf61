"""The report as a reader sees it: rendered in headless Chromium (Debian's `chromium`), every
image decoded, no figure title wider than its image, no script error, no network request, a
screenshot kept for review.

Chromium is a system package (`.ci/run` installs it). Without it the test skips saying so,
except under CI (CI set), where a missing browser is a failure, not a skip.
"""

import os
from pathlib import Path

import pytest
import torch

from umeml.data.cohort import load_data_dir
from umeml.report import write_report
from umeml.train.central import train_central

from browser import find_chromium, render
from fed_helpers import tiny_experiment

SCREENSHOT_DIR_ENV = "UMEML_SCREENSHOT_DIR"  # where to keep screenshots (for the closing note), if set


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium); CI must run the browser test")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return path


@pytest.mark.slow  # Chromium
@pytest.mark.timeout(300)
def test_report_renders_in_headless_chromium(chromium, tiny_cohort_dir, tmp_path):
    torch.set_num_threads(1)
    # drop_path, lr and the federation section at their defaults, as this test has always trained
    cfg = tiny_experiment(name="browser-test", bootstrap=20, split={"test_sites": ["A2"]}, model={"drop_path": 0.1},
                          train={"lr": 2e-4}, rounds=3, k_min_patients=10)
    run = tmp_path / "run"
    train_central(cfg, load_data_dir(tiny_cohort_dir, cfg.data), run, progress=False)
    page = write_report(run)
    result = render(page, tmp_path / "profile", chromium)
    keep = os.environ.get(SCREENSHOT_DIR_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "report-centralized.png").write_bytes(result.screenshot)
    plots = sorted((run / "plots").glob("*.png"))
    assert result.title == "umeml centralized run: browser-test"
    assert len(result.images) == len(plots) >= 8
    for img in result.images:
        assert img["complete"] and img["width"] > 100 and img["height"] > 100, img
        # no figure title is wider than the image the browser decoded (extents measured at save time
        # with matplotlib's renderer, in the PNG's pixels)
        assert img["titles"] is not None, img["src"]
        for x0, x1, y0, y1 in img["titles"]:
            assert 0 <= x0 < x1 <= img["width"] and 0 <= y0 < y1 <= img["height"], img
    assert sum(bool(img["titles"]) for img in result.images) >= len(result.images) - 1
    assert result.errors == []
    # the page is self-contained: the only request is the file itself (images are data URIs)
    assert [r for r in result.requests if not r.startswith("data:")] == [page.resolve().as_uri()]
    assert result.screenshot.startswith(b"\x89PNG")


@pytest.mark.slow  # Chromium
def test_browser_helper_reports_broken_images_and_script_errors(chromium, tmp_path):
    """The check can fail: a page with a broken image and a throwing script is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>bad</title></head><body>"
                   "<img src='data:image/png;base64,AAAA'><script>undefinedFunction()</script></body></html>")
    result = render(bad, tmp_path / "profile", chromium)
    assert result.images and result.images[0]["width"] == 0
    assert any("undefinedFunction" in e for e in result.errors), result.errors
