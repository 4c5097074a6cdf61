"""End to end: `umeml-client extract` on slides the tests write (Aperio SVS, pyramidal TIFF),
offline, with a tiny random-init encoder; resume, failures, missing pixel size, data-layer loading."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("timm")
h5py = pytest.importorskip("h5py")

from bench._slides import (  # noqa: E402
    corrupt_tile,
    disable_network,
    make_slide_image,
    tissue_patch_count,
    write_aperio_svs,
    write_pyramidal_tiff,
)
from umeml.client.cli import main  # noqa: E402
from umeml.client.extract.encoders import load_encoder  # noqa: E402
from umeml.client.extract.grid import plan_read  # noqa: E402
from umeml.client.extract.pipeline import ExtractOptions, PatchChunks, extract_slides  # noqa: E402
from umeml.client.extract.slides import open_slide, resolve_target  # noqa: E402
from umeml.data.bags import inspect_bag, read_coords, read_features  # noqa: E402

# a.svs: Aperio, 20x, 0.5 um/px, levels 1 and 4; 256 px patches at 0.5 um = 256 level-0 px
RECTS_A = [(256, 256, 768, 512), (1280, 768, 512, 512)]
# b.tif: generic TIFF, 0.25 um/px, levels 1, 2, 4; 256 px patches at 0.5 um = 512 level-0 px (read at level 1)
RECTS_B = [(0, 1024, 2048, 1024)]
EXPECTED = {"a": tissue_patch_count(RECTS_A, 256), "b": tissue_patch_count(RECTS_B, 512)}
SIZES = {"a": (2048, 1536), "b": (2048, 2048)}
TINY = ["--encoder", "vit_tiny", "--random-init", "--input-size", "32", "--batch-size", "4", "--no-progress", "-q"]


_ENCODERS: dict[tuple, object] = {}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network (nor may the DataLoader workers it forks)."""
    disable_network(monkeypatch)


@pytest.fixture(autouse=True)
def build_encoders_once(monkeypatch):
    """The CLI builds its encoder on each run; random initialisation is the slow part of these
    tests, so a random-init encoder is built once per set of arguments and reused."""
    from umeml.client.extract import encoders

    def cached(name, weights=None, random_init=False, input_size=None):
        if not random_init:
            return load_encoder(name, weights=weights, input_size=input_size)
        key = (name, input_size)
        if key not in _ENCODERS:
            _ENCODERS[key] = load_encoder(name, random_init=True, input_size=input_size)
        return _ENCODERS[key]

    monkeypatch.setattr(encoders, "load_encoder", cached)


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    write_aperio_svs(d / "a.svs", make_slide_image(*SIZES["a"], RECTS_A, seed=1), mpp=0.5, app_mag=20, downsamples=(1, 4))
    write_pyramidal_tiff(d / "b.tif", make_slide_image(*SIZES["b"], RECTS_B, seed=2), mpp=0.25, downsamples=(1, 2, 4))
    return d


@pytest.fixture()
def tiny_encoder():
    from umeml.client.extract import encoders

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encoders.load_encoder("vit_tiny", random_init=True, input_size=32)


def _run(*argv: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning
        return main(["extract", *map(str, argv)])


def _inside(coord, rects, p) -> bool:
    x, y = coord
    return any(rx <= x and x + p <= rx + rw and ry <= y and y + p <= ry + rh for rx, ry, rw, rh in rects)


def test_extract_writes_bags_then_resume_skips(slide_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run("--slides", slide_dir, "--out", out, "--workers", "2", *TINY) == 0
    for sid, rects, p0, level in (("a", RECTS_A, 256, 0), ("b", RECTS_B, 512, 1)):
        info = inspect_bag(out / f"{sid}.h5")
        assert info.n_patches == EXPECTED[sid]
        assert (info.feature_dim, info.dtype) == (192, "float16")
        a = info.attrs
        assert a["encoder"] == "vit_tiny" and a["weights_sha256"] == "random-init"
        assert (a["patch_size"], a["patch_size_level0"], a["level"]) == (256, p0, level)
        assert a["mpp"] == pytest.approx(0.5) and a["magnification"] == pytest.approx(20.0)
        assert a["slide"] == f"{sid}{'.svs' if sid == 'a' else '.tif'}" and a["umeml_version"]
        assert a["downsample"] == pytest.approx(p0 / 256)
        coords = read_coords(out / f"{sid}.h5")
        assert coords.dtype == np.int64 and coords.shape == (EXPECTED[sid], 2)
        w, h = SIZES[sid]
        assert (coords >= 0).all() and (coords[:, 0] + p0 <= w).all() and (coords[:, 1] + p0 <= h).all()
        assert all(_inside(c, rects, p0) for c in coords)
        feats = read_features(out / f"{sid}.h5")
        assert feats.shape == (EXPECTED[sid], 192) and np.isfinite(feats).all()
        assert (out / "qc" / f"{sid}.png").stat().st_size > 0
    assert not (out / "failures.csv").exists()
    assert not list(out.glob(".*tmp*"))

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    capsys.readouterr()
    assert _run("--slides", slide_dir, "--out", out, "--workers", "0", *TINY) == 0
    err = capsys.readouterr().err
    assert "0 extracted" in err and "2 already done" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamps

    # a rerun with other settings does not mix bags: it refuses the slide and says why
    assert _run("--slides", slide_dir / "a.svs", "--out", out, "--patch-size", "128", *TINY) == 1
    rows = list(csv.DictReader(open(out / "failures.csv")))
    assert rows[0]["slide_id"] == "a" and rows[0]["stage"] == "resume" and "patch_size" in rows[0]["reason"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == stamps


def test_patches_hold_tissue_at_their_coordinates(slide_dir, tmp_path):
    out = tmp_path / "out"
    assert _run("--slides", slide_dir / "b.tif", "--out", out, "--workers", "0", *TINY) == 0
    coords = read_coords(out / "b.h5")
    with open_slide(slide_dir / "b.tif") as s:
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.5), 256)
    patches = PatchChunks(slide_dir / "b.tif", coords, plan, out_size=256, chunk_size=len(coords))[0][0].numpy()
    sat = patches.max(-1).astype(int) - patches.min(-1).astype(int)
    assert patches.shape == (len(coords), 256, 256, 3)
    assert (sat.mean(axis=(1, 2)) > 40).all()  # pink tissue everywhere, no glass


def test_features_do_not_depend_on_workers_or_batch_size(slide_dir, tmp_path, tiny_encoder):
    runs = {}
    for workers, batch in ((0, 3), (2, 18)):  # 18: chunks of 9 joined into batches
        out = tmp_path / f"w{workers}"
        opts = ExtractOptions(num_workers=workers, batch_size=batch, progress=False, qc=False, dtype="float32",
                              device="cpu")  # exact comparison: no batch-size dependent GPU kernels
        summary = extract_slides([slide_dir / "a.svs"], out, tiny_encoder, opts)
        assert summary.done == 1 and summary.n_patches == EXPECTED["a"]
        runs[workers] = (read_features(out / "a.h5"), read_coords(out / "a.h5"))
    np.testing.assert_array_equal(runs[0][1], runs[2][1])
    np.testing.assert_allclose(runs[0][0], runs[2][0], rtol=1e-5, atol=1e-5)


def test_bad_slides_are_recorded_and_the_batch_goes_on(slide_dir, tmp_path, capsys):
    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy(slide_dir / "a.svs", d / "good.svs")
    # 4096 px wide: its thumbnail comes from level 1, so the corrupt level-0 tile is met by a
    # patch-reading worker, mid-slide
    img = make_slide_image(4096, 768, [(0, 256, 2048, 512)], seed=5)
    write_aperio_svs(d / "corrupt.svs", img, downsamples=(1, 2))
    corrupt_tile(d / "corrupt.svs", 1100, 300)
    write_aperio_svs(d / "corrupt_thumb.svs", img, downsamples=(1, 2))
    corrupt_tile(d / "corrupt_thumb.svs", 550, 150, page=2)  # level 1 (page 1 is the thumbnail image)
    (d / "garbage.svs").write_bytes(b"\x00not a slide" * 1000)
    out = tmp_path / "out"
    assert _run("--slides", d, "--out", out, "--workers", "2", *TINY) == 1
    assert "1 extracted" in capsys.readouterr().err
    assert inspect_bag(out / "good.h5").n_patches == EXPECTED["a"]
    rows = {r["slide_id"]: r for r in csv.DictReader(open(out / "failures.csv"))}
    assert set(rows) == {"corrupt", "corrupt_thumb", "garbage"}
    assert rows["garbage"]["stage"] == "open" and "garbage.svs" in rows["garbage"]["reason"]
    assert rows["corrupt"]["stage"] == "features" and "JPEG" in rows["corrupt"]["reason"]
    assert rows["corrupt_thumb"]["stage"] == "tissue" and "JPEG" in rows["corrupt_thumb"]["reason"]
    assert sorted(p.name for p in out.glob("*.h5")) == ["good.h5"]
    assert not list(out.glob(".*tmp*"))  # no half-written bag left behind


def test_missing_pixel_size_fails_clearly_unless_assumed(tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    write_pyramidal_tiff(d / "nompp.tif", make_slide_image(1024, 1024, [(0, 0, 512, 1024)]), mpp=None, downsamples=(1, 2))
    out = tmp_path / "out"
    assert _run("--slides", d, "--out", out, *TINY) == 1
    (row,) = csv.DictReader(open(out / "failures.csv"))
    assert row["stage"] == "resolution" and "no pixel size" in row["reason"] and "--assume-mpp" in row["reason"]
    assert _run("--slides", d, "--out", out, "--assume-mpp", "0.5", *TINY) == 0
    info = inspect_bag(out / "nompp.h5")
    assert info.attrs["mpp_source"] == "assumed" and info.n_patches == 2 * 4
    assert not (out / "failures.csv").exists()  # a clean rerun clears the failures file


def test_target_magnification(slide_dir, tmp_path):
    out = tmp_path / "out"
    # b.tif has a pixel size but no objective power: 20x is taken as 0.5 um/px
    assert _run("--slides", slide_dir / "b.tif", "--out", out, "--magnification", "20", *TINY) == 0
    a = inspect_bag(out / "b.h5").attrs
    assert a["magnification"] == 20 and a["mpp"] == pytest.approx(0.5) and a["target_magnification"] == 20
    assert inspect_bag(out / "b.h5").n_patches == EXPECTED["b"]


def test_duplicate_slide_ids_and_usage_errors(slide_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(slide_dir / "a.svs", other / "a.svs")
    assert _run("--slides", slide_dir / "a.svs", other / "a.svs", "--out", tmp_path / "o", *TINY) == 2
    assert "duplicates" in capsys.readouterr().err
    assert main(["extract", "--slides", str(slide_dir), "--out", str(tmp_path / "o"), "--encoder", "vit_tiny"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert _run("--slides", tmp_path / "nothing", "--out", tmp_path / "o", *TINY) == 2
    assert main(["extract", "--mpp", "0.5", "--magnification", "20"]) == 2  # argparse's usage error, returned


def test_resnet50_trunc_random_init_acceptance(slide_dir, tmp_path):
    """The issue's acceptance command on a folder of .svs files (in-process, offline)."""
    d = tmp_path / "svs"
    d.mkdir()
    shutil.copy(slide_dir / "a.svs", d / "a.svs")
    out = tmp_path / "out"
    assert _run("--slides", d, "--out", out, "--encoder", "resnet50_trunc", "--random-init", "--batch-size", "16",
                "--no-progress", "-q") == 0
    info = inspect_bag(out / "a.h5")
    assert (info.n_patches, info.feature_dim, info.encoder) == (EXPECTED["a"], 1024, "resnet50_trunc")
    assert info.attrs["encoder_input_size"] == 256
    assert np.isfinite(read_features(out / "a.h5")).all()


def test_console_script_help():
    exe = Path(sys.executable).with_name("umeml-client")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "umeml.client.cli"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "extract" in res.stdout
    res = subprocess.run([*cmd, "extract", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--assume-mpp" in res.stdout and "--random-init" in res.stdout
