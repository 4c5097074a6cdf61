"""Benchmark of `umeml-client extract`: the readers, and end-to-end patches/s against references.

``--readers-only``: the two patch readers alone, in this process on one core, on the same slide
(one per photometric case): openslide ``read_region`` + RGB + resize, and the raw-tile reader
(compressed tiles read by byte range, JPEGTables spliced, decoded at the target scale). The
variants are interleaved, each repeat with fresh handles (no tile cache carried over), and the
best and median are printed with their ratio and the load average.

Otherwise, per encoder, interleaved over ``--repeats`` and reported as best and median:
- ceiling: the encoder alone on patches already decoded and in memory (on the device), batched;
- readers alone: the pipeline's DataLoader workers reading and resizing patches, no encoder,
  with openslide and with the raw reader;
- naive: a CLAM-style loop in one process: ``read_region`` per patch, convert, resize, per-patch
  ToTensor + Normalize, stack, then the encoder on the batch;
- pipeline: :func:`umeml.client.extract.pipeline.extract_slides` end to end on the slide
  (tissue segmentation, QC image, DataLoader readers overlapped with inference, h5 writing),
  with ``--reader openslide`` and ``--reader auto`` (the raw reader on this slide).

All run in this process on the same synthetic 40x Aperio slide (JPEG tiles with JPEGTables,
levels 1/4/16, 0.25 um/px; patches of 256 px at 0.5 um, so 512 px read at level 0 and halved),
with the same encoder (random init: speed does not depend on the weights), batch size, device
and precision. Prints markdown tables; ``--json`` also writes the numbers. Self-contained (no
shared bench harness).

    python -m bench.bench_extract --readers-only --threads 1
    python -m bench.bench_extract --threads 2          # CPU: vit_tiny and resnet50_trunc
    python -m bench.bench_extract --patches 4096 --batch-size 256   # on a GPU box
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench._slides import write_large_svs
from umeml.client.extract.encoders import Encoder, NormalizedEncoder, get_encoder_spec
from umeml.client.extract.grid import plan_read
from umeml.client.extract.pipeline import (
    ExtractOptions,
    PatchChunks,
    autocast_context,
    default_workers,
    extract_slides,
    resolve_device,
)
from umeml.client.extract.readers import OpenSlideReader, choose_reader
from umeml.client.extract.slides import open_slide, resolve_target

TILE = 256
MARGIN = 512
PATCH0 = 512  # level-0 pixels per patch (256 px at 0.5 um from a 0.25 um scan)
READER_GOAL = 3.0  # raw reader vs openslide, per core
PIPELINE_GOAL = 0.9  # end to end vs the encoder alone


def make_slide(directory: Path, n_patches: int, photometric: str = "ycbcr", quality: int = 90) -> tuple[Path, int]:
    """A slide whose tissue holds about ``n_patches`` patches; returns it and the exact count."""
    cols = max(1, math.ceil(math.sqrt(n_patches * 1.5)))
    rows = max(1, math.ceil(n_patches / cols))
    width, height = cols * PATCH0 + 2 * MARGIN, rows * PATCH0 + 2 * MARGIN
    path = write_large_svs(directory / f"bench_{photometric}_q{quality}.svs", width, height, margin=MARGIN,
                           photometric=photometric, tables=True, quality=quality)
    return path, cols * rows


def load_text() -> str:
    """``uptime``'s line (the machine is shared: every figure is read against it)."""
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _stats(seconds: list[float], n: int) -> dict:
    """Best and median rate (patches/s) and time per patch (ms) of repeated runs over ``n`` patches."""
    best, med = min(seconds), statistics.median(seconds)
    return {"best_s": best, "median_s": med, "best_per_s": n / best, "median_per_s": n / med,
            "best_ms": 1e3 * best / n, "median_ms": 1e3 * med / n, "runs_s": seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- readers alone, one core --------------------------------------------------------------------
def tissue_coords(slide_path: Path, n_patches: int) -> np.ndarray:
    """The level-0 corners of the tissue patches of a bench slide (grid inside the glass margin)."""
    with open_slide(slide_path) as s:
        w, h = s.dimensions
    xs = np.arange(MARGIN, w - MARGIN - PATCH0 + 1, PATCH0)
    ys = np.arange(MARGIN, h - MARGIN - PATCH0 + 1, PATCH0)
    coords = np.array([(x, y) for y in ys for x in xs], np.int64)
    return coords[:n_patches]


def make_readers(slide_path: Path, out_size: int) -> dict:
    """Fresh readers of both kinds (fresh handles: no decoded tile cached from an earlier repeat)."""
    with open_slide(slide_path) as s:
        plan = plan_read(s, resolve_target(s.resolution, slide_path, mpp=0.5), 256)
        raw = choose_reader(s, plan, out_size, "raw").reader
    return {"openslide": OpenSlideReader(slide_path, plan.level, plan.read_size, out_size), "raw": raw}


def time_reader(reader, coords: np.ndarray) -> float:
    t0 = time.perf_counter()
    for x, y in coords:
        reader.read_patch(int(x), int(y))
    seconds = time.perf_counter() - t0
    reader.close()
    return seconds


def bench_readers(slide_path: Path, coords: np.ndarray, out_size: int, repeats: int) -> dict:
    """Both readers on the same patches, interleaved (the order alternates per repeat)."""
    for reader in make_readers(slide_path, out_size).values():  # warm-up: page cache, libraries
        time_reader(reader, coords[: min(16, len(coords))])
    runs: dict[str, list[float]] = {"openslide": [], "raw": []}
    for rep in range(repeats):
        readers = make_readers(slide_path, out_size)
        for name in (("openslide", "raw") if rep % 2 == 0 else ("raw", "openslide")):
            runs[name].append(time_reader(readers[name], coords))
    stats = {name: _stats(v, len(coords)) for name, v in runs.items()}
    raw_reader = make_readers(slide_path, out_size)["raw"]
    return {
        "patches": len(coords), "out_size": out_size, "decoder": raw_reader.decoder, "readers": stats,
        "ratio_best": stats["openslide"]["best_s"] / stats["raw"]["best_s"],
        "ratio_median": stats["openslide"]["median_s"] / stats["raw"]["median_s"],
    }


def run_readers_only(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Both photometric cases at Q90 (the end-to-end slide's quality) and Q70 (TCGA's usual
    Aperio quality), to 256 px (ResNet) and 224 px (ViT) patches."""
    results = []
    for photometric in ("ycbcr", "rgb"):
        for quality in (90, 70):
            slide_path, n = make_slide(workdir, args.patches or 256, photometric, quality)
            coords = tissue_coords(slide_path, n)
            for out_size in (256, 224):
                load0 = os.getloadavg()[0]
                res = bench_readers(slide_path, coords, out_size, args.repeats)
                res.update(photometric=photometric, quality=quality, load_start=load0, load_end=os.getloadavg()[0])
                results.append(res)
                r = res["readers"]
                print(f"{photometric} Q{quality} -> {out_size}: openslide {r['openslide']['best_ms']:.2f} ms, raw "
                      f"{r['raw']['best_ms']:.2f} ms per patch (best); {res['ratio_best']:.2f}x", file=sys.stderr,
                      flush=True)
            slide_path.unlink()
    return results


def print_readers(results: list[dict]) -> None:
    print("| tiles | quality | output px | patches | openslide ms/patch (best / median) | raw ms/patch (best / median) "
          "| raw decode | raw / openslide speed (best / median) | load average |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        o, r = res["readers"]["openslide"], res["readers"]["raw"]
        tiles = "YCbCr 4:2:0" if res["photometric"] == "ycbcr" else "RGB 4:4:4 (Adobe)"
        print(f"| {tiles} | Q{res['quality']} | {res['out_size']} | {res['patches']} | "
              f"{o['best_ms']:.2f} / {o['median_ms']:.2f} | "
              f"{r['best_ms']:.2f} / {r['median_ms']:.2f} | {res['decoder']} | {res['ratio_best']:.2f}x / "
              f"{res['ratio_median']:.2f}x | {res['load_start']:.1f} -> {res['load_end']:.1f} |")
    worst = min(res["ratio_median"] for res in results)
    print(f"\ngoal raw >= {READER_GOAL:g}x openslide per core: {'met' if worst >= READER_GOAL else 'NOT met'} "
          f"(lowest median ratio {worst:.2f}x)")


# -- end to end ---------------------------------------------------------------------------------
def run_ceiling(model, patches: torch.Tensor, batch: int, device, precision) -> float:
    """Seconds for the encoder alone over pre-decoded patches already on the device."""
    x_all = patches.to(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast_context(device, precision):
        for i in range(0, len(x_all), batch):
            model(x_all[i : i + batch]).float().cpu()
    _sync(device)
    return time.perf_counter() - t0


def run_loader(chunks: PatchChunks, workers: int, pin: bool) -> float:
    """Seconds for the pipeline's parallel patch reading alone (DataLoader workers, no encoder)."""
    t0 = time.perf_counter()
    loader = DataLoader(chunks, batch_size=None, num_workers=workers, pin_memory=pin,
                        prefetch_factor=4 if workers else None)
    for _chunk, _index in loader:
        pass
    return time.perf_counter() - t0


def run_naive(model, encoder, slide_path: Path, coords, plan, out_size, batch, device, precision) -> float:
    """Seconds for the CLAM-style loop: read_region per patch in this process, then the batch."""
    import openslide
    from PIL import Image
    from torchvision.transforms import functional as TF

    mean, std = list(encoder.spec.mean), list(encoder.spec.std)
    raw = model.model
    t0 = time.perf_counter()
    osr = openslide.OpenSlide(str(slide_path))
    with torch.inference_mode(), autocast_context(device, precision):
        for i in range(0, len(coords), batch):
            tensors = []
            for x, y in coords[i : i + batch]:
                img = osr.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size)).convert("RGB")
                if plan.read_size != out_size:
                    img = img.resize((out_size, out_size), Image.Resampling.BILINEAR)
                tensors.append(TF.normalize(TF.to_tensor(img), mean, std))
            raw(torch.stack(tensors).to(device)).float().cpu().numpy()
    osr.close()
    _sync(device)
    return time.perf_counter() - t0


def run_pipeline(encoder, slide_path: Path, out_dir: Path, args, device, reader: str,
                 decode: str = "auto") -> tuple[float, int]:
    """Seconds for extract_slides end to end, and the patches it wrote."""
    shutil.rmtree(out_dir, ignore_errors=True)
    opts = ExtractOptions(mpp=0.5, patch_size=256, batch_size=args.batch_size, num_workers=args.workers,
                          device=str(device), precision=args.precision, progress=False, overwrite=True, reader=reader,
                          decode=decode)
    t0 = time.perf_counter()
    summary = extract_slides([slide_path], out_dir, encoder, opts)
    seconds = time.perf_counter() - t0
    if summary.failed:
        raise RuntimeError(f"pipeline failed: {summary.results[0].reason}")
    return seconds, summary.n_patches


def random_encoder(name: str, device: torch.device) -> Encoder:
    """A random-init encoder built directly on ``device`` (initialising a ViT-L on a GPU takes a
    moment, on a CPU much longer; speed does not depend on the weights)."""
    spec = get_encoder_spec(name)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = spec.build()
    return Encoder(spec=spec, model=model.eval().requires_grad_(False), weights_sha256="random-init",
                   input_size=spec.input_size, random_init=True)


def _setup(name: str, slide_path: Path, n_patches: int, args, device: torch.device, workdir: Path) -> dict:
    """The encoder, the pipeline's own grid (a first, untimed run) and pre-decoded patches."""
    encoder = random_encoder(name, device)
    model = NormalizedEncoder(encoder).to(device).eval()
    if encoder.spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    out_size = encoder.input_size or 256
    with open_slide(slide_path) as slide:
        plan = plan_read(slide, resolve_target(slide.resolution, slide_path, mpp=0.5), 256)
        raw = choose_reader(slide, plan, out_size, "raw").reader
    _, n = run_pipeline(encoder, slide_path, workdir / "warm", args, device, "auto")
    from umeml.data.bags import read_coords

    coords = read_coords(workdir / "warm" / f"{slide_path.stem}.h5")
    assert len(coords) == n_patches == n, (len(coords), n_patches, n)
    chunks = {"openslide": PatchChunks(slide_path, coords, plan, out_size, chunk_size=16),
              "raw": PatchChunks(slide_path, coords, plan, out_size, chunk_size=16, reader=raw)}
    patches = torch.cat([chunk for chunk, _ in DataLoader(chunks["raw"], batch_size=None,
                                                          num_workers=max(1, args.workers))])
    run_ceiling(model, patches[: args.batch_size], args.batch_size, device, args.precision)  # kernel warm-up
    return {"encoder": encoder, "model": model, "out_size": out_size, "plan": plan, "coords": coords,
            "chunks": chunks, "patches": patches}


def bench_encoder(name: str, slide_path: Path, n_patches: int, args, device: torch.device, workdir: Path) -> dict:
    s = _setup(name, slide_path, n_patches, args, device, workdir)
    pin = device.type == "cuda"
    modes = {
        "ceiling": lambda: run_ceiling(s["model"], s["patches"], args.batch_size, device, args.precision),
        "readers_openslide": lambda: run_loader(s["chunks"]["openslide"], args.workers, pin),
        "readers_raw": lambda: run_loader(s["chunks"]["raw"], args.workers, pin),
        "naive": lambda: run_naive(s["model"], s["encoder"], slide_path, s["coords"], s["plan"], s["out_size"],
                                   args.batch_size, device, args.precision),
        "pipeline_openslide": lambda: run_pipeline(s["encoder"], slide_path, workdir / "run", args, device, "openslide")[0],
        "pipeline_raw": lambda: run_pipeline(s["encoder"], slide_path, workdir / "run", args, device, "auto")[0],
    }
    if device.type == "cuda":  # the raw reader decoding in the reader processes instead of on the GPU
        modes["pipeline_raw_workers"] = lambda: run_pipeline(s["encoder"], slide_path, workdir / "run", args, device,
                                                             "auto", decode="workers")[0]
    if args.skip_naive:
        del modes["naive"]
    runs: dict[str, list[float]] = {k: [] for k in modes}
    for rep in range(args.repeats):  # interleaved; the order turns each repeat
        order = list(modes)[rep % len(modes):] + list(modes)[: rep % len(modes)]
        for mode in order:
            runs[mode].append(modes[mode]())
    n = len(s["coords"])
    stats = {k: _stats(v, n) for k, v in runs.items()}
    best = {k: v["best_per_s"] for k, v in stats.items()}
    med = {k: v["median_per_s"] for k, v in stats.items()}
    return {"encoder": name, "input_size": s["out_size"], "patches": n, "stats": stats,
            "raw_vs_ceiling_best": best["pipeline_raw"] / best["ceiling"],
            "raw_vs_ceiling_median": med["pipeline_raw"] / med["ceiling"],
            "openslide_vs_ceiling_best": best["pipeline_openslide"] / best["ceiling"]}


def print_end_to_end(results: list[dict]) -> None:
    def cell(res: dict, mode: str) -> str:
        st = res["stats"].get(mode)
        return "-" if st is None else f"{st['best_per_s']:.1f} / {st['median_per_s']:.1f}"

    print("patches/s, best / median of the repeats:\n")
    print("| encoder | input px | patches | encoder alone (ceiling) | readers alone, openslide | readers alone, raw "
          "| naive loop | pipeline, openslide | pipeline, raw | pipeline raw / ceiling (best / median) "
          "| pipeline openslide / ceiling (best) | pipeline, raw decoded in the readers (CUDA only) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        print(f"| {res['encoder']} | {res['input_size']} | {res['patches']} | {cell(res, 'ceiling')} | "
              f"{cell(res, 'readers_openslide')} | {cell(res, 'readers_raw')} | {cell(res, 'naive')} | "
              f"{cell(res, 'pipeline_openslide')} | {cell(res, 'pipeline_raw')} | {res['raw_vs_ceiling_best']:.2f}x / "
              f"{res['raw_vs_ceiling_median']:.2f}x | {res['openslide_vs_ceiling_best']:.2f}x | "
              f"{cell(res, 'pipeline_raw_workers')} |")
    for res in results:
        ok = res["raw_vs_ceiling_median"] >= PIPELINE_GOAL
        print(f"\ngoal {res['encoder']} end to end >= {PIPELINE_GOAL:g}x the encoder alone: "
              f"{'met' if ok else 'NOT met'} ({res['raw_vs_ceiling_median']:.2f}x median, "
              f"{res['raw_vs_ceiling_best']:.2f}x best)", end="")
    print()


def run_end_to_end(args: argparse.Namespace, device: torch.device, workdir: Path) -> list[dict]:
    results = []
    for name in args.encoders.split(","):
        n_req = args.patches or (192 if (device.type == "cpu" and name not in {"vit_tiny"}) else 768)
        slide_dir = workdir / name
        slide_dir.mkdir()
        slide_path, n = make_slide(slide_dir, n_req)
        t0 = time.perf_counter()
        res = bench_encoder(name, slide_path, n, args, device, slide_dir)
        res["bench_seconds"] = time.perf_counter() - t0
        results.append(res)
        b = {k: v["best_per_s"] for k, v in res["stats"].items()}
        print(f"{name}: ceiling {b['ceiling']:.1f}, pipeline openslide {b['pipeline_openslide']:.1f}, "
              f"raw {b['pipeline_raw']:.1f} patches/s (best); {load_text()}", file=sys.stderr, flush=True)
    return results


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readers-only", action="store_true", help="the two readers alone, one core, interleaved")
    p.add_argument("--encoders", default="vit_tiny,resnet50_trunc")
    p.add_argument("--patches", type=int, default=None,
                   help="patches in the slide (default: readers 256; end to end 768 for vit_tiny, 192 for "
                        "bigger encoders on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    p.add_argument("--workers", type=int, default=None, help="reader processes (default: cores - 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-naive", action="store_true", help="leave out the naive loop (saves time)")
    p.add_argument("--threads", type=int, help="torch threads in this process (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    args.workers = default_workers() if args.workers is None else args.workers
    torch.backends.cudnn.benchmark = True
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "workers": args.workers,
        "batch_size": args.batch_size, "precision": args.precision, "torch": torch.__version__,
        "uptime_start": load_text(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.readers_only:
            results = run_readers_only(args, Path(tmp))
        else:
            results = run_end_to_end(args, device, Path(tmp))
    env["uptime_end"] = load_text()
    print(f"\ndevice: {env['device']} ({env['cores']} cores, {env['torch_threads']} torch threads), workers "
          f"{env['workers']}, batch {env['batch_size']}, precision {env['precision']}, torch {env['torch']}, "
          f"{args.repeats} interleaved repeats\nuptime at start: {env['uptime_start']}\nuptime at end:   "
          f"{env['uptime_end']}\n")
    if args.readers_only:
        print_readers(results)
    else:
        print_end_to_end(results)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
