"""The raw-tile reader and the device decode path against openslide, on JPEG pyramids written here.

Equal output means PSNR >= 35 dB against openslide's patch after the same resize, per
photometric case (RGB-coded tiles with an Adobe marker; YCbCr 4:2:0), with and without
JPEGTables, and per pyramid level choice (level 0 halved by scaled DCT, level 0 as is, a reduced
level as is and halved, a non-integer resize). The device path runs its batching and assembly
code on CPU tensors (torchvision's libjpeg decode) here; on CUDA the same code uses nvJPEG.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("tifffile")
pytest.importorskip("torchvision")

from PIL import Image

from bench._slides import (
    corrupt_tile,
    make_slide_image,
    split_jpeg_tables,
    write_jpeg_pyramid,
    write_pyramidal_tiff,
)
from umeml.client.extract.devicedecode import DeviceTileDecoder, psnr
from umeml.client.extract.grid import plan_read
from umeml.client.extract.rawtiles import (
    RawTileReader,
    decode_scale,
    decode_tile,
    jpeg_header,
    probe_raw_level,
    splice_jpeg,
)
from umeml.client.extract.readers import OpenSlideReader, choose_reader
from umeml.client.extract.slides import SlideError, open_slide, resolve_target

# 40x (0.25 um/px), levels 1, 4, 16 (as Aperio writes them); not a multiple of the tile size, so
# the right and bottom tiles of every level are edge tiles (padded with black in the file)
SIZE = (2600, 2000)
RECTS = [(0, 0, 2600, 2000)]
DOWNSAMPLES = (1, 4, 16)
MIN_PSNR = 35.0


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory):
    d = tmp_path_factory.mktemp("jpeg_pyramids")
    img = make_slide_image(*SIZE, RECTS, seed=3)
    out = {}
    for photometric in ("rgb", "ycbcr"):
        for tables in (True, False):
            name = f"{photometric}_{'tables' if tables else 'full'}"
            out[name] = write_jpeg_pyramid(d / f"{name}.svs", img, photometric=photometric, tables=tables,
                                           downsamples=DOWNSAMPLES)
    out["generic"] = write_jpeg_pyramid(d / "generic.tif", img, photometric="ycbcr", downsamples=DOWNSAMPLES,
                                        aperio=False)
    # a zero-length level-0 tile (an Aperio encoder bug seen in the wild): x 768..1023, y 0..255
    out["missing"] = write_jpeg_pyramid(d / "missing.svs", img, photometric="ycbcr", downsamples=DOWNSAMPLES, missing=(3,))
    out["zlib"] = write_pyramidal_tiff(d / "zlib.tif", img, mpp=0.25, downsamples=(1, 4))
    return out


def _readers(path, mpp, out_size=256, patch_size=256):
    with open_slide(path) as s:
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=mpp), patch_size)
        choice = choose_reader(s, plan, out_size, "auto")
    return plan, choice.reader, OpenSlideReader(path, plan.level, plan.read_size, out_size)


def _grid(plan, limit=12):
    p0 = plan.patch_size_level0
    xs = range(0, SIZE[0] - p0 + 1, p0)
    ys = range(0, SIZE[1] - p0 + 1, p0)
    coords = [(x, y) for y in ys for x in xs]
    step = max(1, len(coords) // limit)
    return np.array(coords[::step] + [coords[-1]], np.int64)  # the last one touches the edge tiles


# (target mpp, output px) -> (level, read px, decode scale)
LEVEL_CASES = {
    (0.5, 256): (0, 512, 2),  # 40x -> 20x: level 0, decoded at 1/2 (the TCGA case)
    (0.25, 256): (0, 256, 1),  # level 0 as is
    (1.0, 256): (1, 256, 1),  # a reduced level as is
    (2.0, 128): (1, 256, 2),  # a reduced level, decoded at 1/2
    (4.0, 64): (1, 256, 4),  # level 2's downsample is 16.02 (2600 / 162), so level 1 at 1/4
    (4.2, 64): (2, 67, 1),  # level 2: fractional level positions, interpolated as openslide does
    (0.5, 224): (0, 512, 2),  # non-integer resize after the scaled decode (ViT input)
    (0.75, 64): (0, 192, 2),  # 192 -> 96 by scaled DCT, then a non-integer resize to 64
}


# every level choice in both photometric cases (tables in JPEGTables); tables in every tile and a
# generic (non-Aperio) TIFF for two of them
MATCH_CASES = [(name, case) for name in ("rgb_tables", "ycbcr_tables") for case in LEVEL_CASES] + [
    (name, case) for name in ("rgb_full", "ycbcr_full", "generic") for case in ((0.5, 256), (1.0, 256))]


@pytest.mark.parametrize(("name", "case"), MATCH_CASES, ids=[f"{n}-mpp{c[0]}-out{c[1]}" for n, c in MATCH_CASES])
def test_raw_reader_matches_openslide(pyramids, name, case):
    mpp, out = case
    patch_size = 256 if out == 224 else out
    plan, raw, osr = _readers(pyramids[name], mpp, out_size=out, patch_size=patch_size)
    assert isinstance(raw, RawTileReader), "a JPEG-tiled SVS is read raw under --reader auto"
    assert (plan.level, plan.read_size, raw.scale) == LEVEL_CASES[case]
    assert raw.raw.photometric == ("ycbcr" if name == "generic" else name.split("_")[0])
    coords = _grid(plan)
    want = [osr.read_patch(int(x), int(y)) for x, y in coords]
    got = [raw.read_patch(int(x), int(y)) for x, y in coords]
    scores = [psnr(a, b) for a, b in zip(want, got)]
    assert min(scores) >= MIN_PSNR, scores
    # the device path (here on CPU tensors): batched decode, assembly by indexing, resize
    on_device = DeviceTileDecoder("cpu").decode([raw.tile_chunk(coords[:5]), raw.tile_chunk(coords[5:])])
    dev = np.concatenate([t.numpy() for t in on_device])
    assert dev.shape == (len(coords), out, out, 3)
    scores = [psnr(a, b) for a, b in zip(want, dev)]
    assert min(scores) >= MIN_PSNR, scores


@pytest.mark.parametrize("name", ["rgb_tables", "ycbcr_full"])
def test_edge_tiles_get_the_background(pyramids, name):
    """Regions that run past a level's edge match openslide, which paints them with the
    background colour (the level's edge tiles hold black padding in the file)."""
    with open_slide(pyramids[name]) as s:
        for level in (0, 1, 2):
            plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.25 * s.level_downsamples[level]), 64)
            raw = choose_reader(s, plan, 64).reader
            assert isinstance(raw, RawTileReader) and raw.read_size == 64
            lw, lh = s.level_dimensions[level]
            ds = s.level_downsamples[level]
            for lx, ly in ((lw - 40, lh - 20), (lw - 64, 0), (0, lh - 30), (lw - 1, lh - 1)):
                want = s.read_rgb((round(lx * ds), round(ly * ds)), level, (64, 64))
                got = raw.read_region(lx, ly)
                assert psnr(want, got) >= MIN_PSNR, (level, lx, ly)
                chunk = raw.tile_chunk(np.array([[round(lx * ds), round(ly * ds)]]))
                dev = DeviceTileDecoder("cpu").decode([chunk])[0][0].numpy()
                assert psnr(want, dev) >= MIN_PSNR, (level, lx, ly)
            assert (raw.read_region(lw - 1, lh - 1)[2:, 2:] == s.background).all()


def test_missing_tiles_follow_openslide(pyramids):
    """A zero-length level-0 tile is blank (background) for openslide and for the raw reader;
    openslide renders the coarser tiles covering it from the finer level, so the raw reader
    leaves those levels to openslide."""
    path = pyramids["missing"]
    with open_slide(path) as s:
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.25), 256)
        raw = choose_reader(s, plan, 256).reader
        assert isinstance(raw, RawTileReader)
        for x, y in ((768, 0), (640, 100), (512, 0)):
            assert psnr(s.read_rgb((x, y), 0, (256, 256)), raw.read_region(x, y)) >= MIN_PSNR
            dev = DeviceTileDecoder("cpu").decode([raw.tile_chunk(np.array([[x, y]]))])[0][0].numpy()
            assert psnr(s.read_rgb((x, y), 0, (256, 256)), dev) >= MIN_PSNR
        assert (raw.read_region(768, 0) == s.background).all()
        for mpp in (1.0, 4.0):
            plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=mpp), 64)
            choice = choose_reader(s, plan, 64)
            assert isinstance(choice.reader, OpenSlideReader)
            assert "missing" in choice.reason and f"level {plan.level - 1}" in choice.reason


def test_jpeg_tables_are_spliced_and_colour_follows_photometric():
    img = make_slide_image(256, 256, [(0, 0, 256, 256)], seed=4)
    for photometric, kwargs in (("rgb", {"subsampling": 0, "keep_rgb": True}), ("ycbcr", {"subsampling": 2})):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90, **kwargs)
        full = buf.getvalue()
        tables, tile = split_jpeg_tables(full)
        assert b"\xff\xdb" not in tile[:200] and b"\xff\xdb" in tables  # the tile has no tables of its own
        stream = splice_jpeg(jpeg_header(tables, photometric), tile)
        ref = np.asarray(Image.open(io.BytesIO(full)).convert("RGB"))
        assert np.array_equal(decode_tile(stream, 256, 256, photometric), ref)
        # Pillow's scaled-DCT draft decode works on the spliced stream and agrees with decode_tile
        im = Image.open(io.BytesIO(stream))
        im.draft("RGB", (128, 128))
        assert im.size == (128, 128)
        half = decode_tile(stream, 256, 256, photometric, scale=2)
        assert np.array_equal(np.asarray(im.convert("RGB")), half)
        for k in (2, 4, 8):
            scaled = decode_tile(stream, 256, 256, photometric, scale=k)
            assert scaled.shape == (256 // k, 256 // k, 3)
            assert psnr(scaled, np.asarray(Image.fromarray(ref).reduce(k))) >= MIN_PSNR
    # an RGB photometric overrides a tile's JFIF (YCbCr) marker, as openslide does: the
    # stream decodes as RGB components, not converted from YCbCr
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    jfif = buf.getvalue()
    as_rgb = decode_tile(splice_jpeg(jpeg_header(None, "rgb"), jfif), 256, 256, "rgb")
    assert psnr(as_rgb, img) < 20
    with pytest.raises(ValueError, match="SOI"):
        splice_jpeg(jpeg_header(None, "rgb"), b"\x00\x01garbage")


def test_decode_scale_rules():
    assert decode_scale(512, 256, 256, 256) == 2
    assert decode_scale(512, 224, 256, 256) == 2  # never below the output size
    assert decode_scale(2048, 256, 256, 256) == 8
    assert decode_scale(256, 256, 256, 256) == 1
    assert decode_scale(717, 256, 256, 256) == 1  # not divisible: full decode, then resize


def test_unsupported_slides_fall_back_to_openslide(pyramids):
    with open_slide(pyramids["zlib"]) as s:
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.5), 256)
        choice = choose_reader(s, plan, 256, "auto")
        assert isinstance(choice.reader, OpenSlideReader)
        assert "ADOBE_DEFLATE" in choice.reason and "JPEG only" in choice.reason
        assert choice.provenance["reader"] == "openslide" and choice.provenance["reader_fallback"] == choice.reason
        with pytest.raises(SlideError, match=r"zlib\.tif: the raw-tile reader cannot read this slide.*--reader auto"):
            choose_reader(s, plan, 256, "raw")
        assert isinstance(choose_reader(s, plan, 256, "openslide").reader, OpenSlideReader)
    # vendor formats are never tried (tifffile does not map their tiles the way openslide does)
    reason = probe_raw_level(pyramids["rgb_tables"].with_suffix(".ndpi"), "hamamatsu", ((2600, 2000),), 0)
    assert isinstance(reason, str) and "hamamatsu" in reason
    with open_slide(pyramids["rgb_tables"]) as s:
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.5), 256)
        choice = choose_reader(s, plan, 256, "openslide")
        assert isinstance(choice.reader, OpenSlideReader) and not choice.reason
        prov = choose_reader(s, plan, 256, "auto").provenance
        assert prov["reader"] == "raw" and prov["reader_decode"] == "pil-scaled-dct-1/2" and "JPEGTables" in prov["reader_level"]


def test_corrupt_tile_raises_slide_error(tmp_path):
    img = make_slide_image(1024, 512, [(0, 0, 1024, 512)], seed=6)
    path = write_jpeg_pyramid(tmp_path / "bad.svs", img, photometric="ycbcr", downsamples=(1, 2))
    corrupt_tile(path, 600, 100)  # tile 2 of level 0
    with open_slide(path) as s:
        plan = plan_read(s, resolve_target(s.resolution, s.path, mpp=0.25), 256)
        raw = choose_reader(s, plan, 256).reader
    assert isinstance(raw, RawTileReader)
    raw.read_patch(0, 0)  # a good tile
    with pytest.raises(SlideError, match=r"bad\.svs: cannot decode JPEG tile 2,0 of level 0"):
        raw.read_patch(512, 0)
    with pytest.raises(SlideError, match="cannot decode JPEG tile 2,0"):  # in a reader process: fails the slide
        raw.tile_chunk(np.array([[512, 0]]))
    chunk = raw.tile_chunk(np.array([[0, 0]]))
    chunk.data[: int(chunk.lengths[0]) // 2] = 0  # the frame and tables gone: the decoder must refuse it
    with pytest.raises(RuntimeError):  # torchvision's decode error (the pipeline fails the slide)
        DeviceTileDecoder("cpu").decode([chunk])


def test_device_check_refuses_a_decoder_that_gets_colours_wrong(pyramids, monkeypatch):
    _plan, raw, _ = _readers(pyramids["rgb_tables"], 0.5)
    good = DeviceTileDecoder("cpu")
    assert good.check(raw) is None
    bad = DeviceTileDecoder("cpu")
    real = bad._decode_streams
    monkeypatch.setattr(bad, "_decode_streams", lambda streams: [t.flip(0) for t in real(streams)])  # BGR
    reason = bad.check(raw)
    assert reason and "unlike libjpeg" in reason and "rgb" in reason


def test_without_tifffile_the_raw_reader_steps_aside(pyramids, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now raises ImportError
    reason = probe_raw_level(pyramids["rgb_tables"], "aperio", ((2600, 2000),), 0)
    assert isinstance(reason, str) and "tifffile is not installed" in reason
