"""The pipeline with its readers: provenance of the reader, raw vs openslide bags, the device
decode path end to end (on CPU tensors), and small slides read together in one stream."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("timm")
pytest.importorskip("h5py")

from bench._slides import (
    corrupt_tile,
    disable_network,
    make_slide_image,
    tissue_patch_count,
    write_jpeg_pyramid,
    write_pyramidal_tiff,
)
from umeml.client.cli import main
from umeml.client.extract import pipeline
from umeml.client.extract.encoders import load_encoder
from umeml.client.extract.pipeline import ExtractOptions, extract_slides
from umeml.data.bags import inspect_bag, read_coords, read_features

RECTS = [(256, 256, 768, 512)]  # 20x slides, 256 px patches: 6 tissue patches each
N = tissue_patch_count(RECTS, 256)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    disable_network(monkeypatch)


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning
        return load_encoder("vit_tiny", random_init=True, input_size=32)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_slides")
    out = {}
    for i, photometric in enumerate(("ycbcr", "rgb", "ycbcr")):
        img = make_slide_image(1280, 1024, RECTS, seed=10 + i)
        out[f"s{i}"] = write_jpeg_pyramid(d / f"s{i}.svs", img, photometric=photometric, mpp=0.5, app_mag=20,
                                          downsamples=(1, 4))
    out["zlib"] = write_pyramidal_tiff(d / "zlib.tif", make_slide_image(1280, 1024, RECTS, seed=20), mpp=0.5,
                                       downsamples=(1, 4))
    return out


def _opts(**kw) -> ExtractOptions:
    base = {"num_workers": 0, "batch_size": 4, "progress": False, "qc": False, "dtype": "float32", "device": "cpu"}
    return ExtractOptions(**{**base, **kw})


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bags_name_their_reader(slides, tmp_path, encoder):
    out = tmp_path / "auto"
    summary = extract_slides([slides["s0"], slides["zlib"]], out, encoder, _opts())
    assert summary.done == 2
    raw, osr = inspect_bag(out / "s0.h5").attrs, inspect_bag(out / "zlib.h5").attrs
    assert raw["reader"] == "raw" and raw["reader_decode"] == "pil-scaled-dct-1/8" and "JPEG tiles, ycbcr" in raw["reader_level"]
    assert "reader_fallback" not in raw
    assert osr["reader"] == "openslide" and "JPEG only" in osr["reader_fallback"]
    summary = extract_slides([slides["s0"]], tmp_path / "os", encoder, _opts(reader="openslide"))
    assert inspect_bag(tmp_path / "os" / "s0.h5").attrs["reader"] == "openslide"
    # the bags of both readers agree (same patches, same encoder)
    cos = _cosine(read_features(out / "s0.h5"), read_features(tmp_path / "os" / "s0.h5"))
    assert cos.min() >= 0.995
    np.testing.assert_array_equal(read_coords(out / "s0.h5"), read_coords(tmp_path / "os" / "s0.h5"))


def test_reader_raw_fails_a_slide_it_cannot_read(slides, tmp_path):
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["extract", "--slides", str(slides["s0"]), str(slides["zlib"]), "--out", str(out), "--reader", "raw",
                     "--encoder", "vit_tiny", "--random-init", "--input-size", "32", "--batch-size", "4",
                     "--workers", "0", "--no-progress", "-q"])
    assert code == 1
    with open(out / "failures.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["slide_id"] == "zlib" and row["stage"] == "reader"
    assert "zlib.tif: the raw-tile reader cannot read this slide" in row["reason"] and "--reader auto" in row["reason"]
    assert inspect_bag(out / "s0.h5").attrs["reader"] == "raw"
    assert main(["extract", "--reader", "fast"]) == 2  # argparse's usage error, returned


def test_device_decode_path_end_to_end_on_cpu(slides, tmp_path, encoder):
    paths = [slides["s0"], slides["s1"]]  # both photometric cases
    extract_slides(paths, tmp_path / "workers", encoder, _opts())
    extract_slides(paths, tmp_path / "device", encoder, _opts(decode="device", num_workers=2))
    for sid in ("s0", "s1"):
        a = inspect_bag(tmp_path / "device" / f"{sid}.h5").attrs
        assert a["reader"] == "raw" and a["reader_decode"] == "torchvision-cpu"
        np.testing.assert_array_equal(read_coords(tmp_path / "device" / f"{sid}.h5"),
                                      read_coords(tmp_path / "workers" / f"{sid}.h5"))
        cos = _cosine(read_features(tmp_path / "device" / f"{sid}.h5"), read_features(tmp_path / "workers" / f"{sid}.h5"))
        assert cos.min() >= 0.995


def test_device_decode_falls_back_when_its_check_fails(slides, tmp_path, encoder, monkeypatch):
    monkeypatch.setattr(pipeline.DeviceTileDecoder, "check", lambda self, reader: "decodes colours wrongly")
    extract_slides([slides["s1"]], tmp_path, encoder, _opts(decode="device"))
    a = inspect_bag(tmp_path / "s1.h5").attrs
    assert a["reader_decode"] == "pil-scaled-dct-1/8" and a["reader_decode_fallback"] == "decodes colours wrongly"


def test_small_slides_are_read_together(slides, tmp_path, encoder, monkeypatch):
    """Three slides of 6 patches with batches of 16: one stream, batches across slide borders,
    and the same bags as slide by slide; a bad slide in the group fails alone."""
    groups, batches = [], []
    real_group, real_call = pipeline.run_group, pipeline._Runner.__call__
    monkeypatch.setattr(pipeline, "run_group", lambda jobs, *a, **k: groups.append(len(jobs)) or real_group(jobs, *a, **k))
    monkeypatch.setattr(pipeline._Runner, "__call__", lambda self, batch: batches.append(len(batch)) or real_call(self, batch))
    paths = [slides["s0"], slides["s1"], slides["s2"]]
    summary = extract_slides(paths, tmp_path / "together", encoder, _opts(batch_size=16, num_workers=2))
    assert summary.done == 3 and groups == [3] and batches == [16, 2]
    for p in paths:
        alone = extract_slides([p], tmp_path / f"alone_{p.stem}", encoder, _opts(batch_size=16))
        assert alone.n_patches == N
        np.testing.assert_allclose(read_features(tmp_path / "together" / f"{p.stem}.h5"),
                                   read_features(tmp_path / f"alone_{p.stem}" / f"{p.stem}.h5"), rtol=1e-4, atol=1e-4)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(slides["s1"].read_bytes())
    corrupt_tile(bad, 600, 300)  # a level-0 tile under the tissue: met by a reader mid-stream
    groups.clear()
    summary = extract_slides([paths[0], bad, paths[2]], tmp_path / "mixed", encoder, _opts(batch_size=16, num_workers=2))
    assert groups == [3] and [r.status for r in summary.results] == ["done", "failed", "done"]
    assert summary.results[1].stage == "features" and "cannot decode JPEG tile" in summary.results[1].reason
    assert sorted(p.name for p in (tmp_path / "mixed").glob("*.h5")) == ["s0.h5", "s2.h5"]
    assert inspect_bag(tmp_path / "mixed" / "s2.h5").n_patches == N
    assert not list((tmp_path / "mixed").glob(".*tmp*"))
