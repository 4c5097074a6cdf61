"""Benchmark of `umeml-client extract`: end-to-end patches/s against two references.

- ceiling: the encoder alone on patches already decoded and in memory (on the device), batched;
- readers alone: the pipeline's DataLoader workers reading and resizing patches, no encoder
  (the other bound on the pipeline: decoding JPEG tiles costs CPU);
- naive: a CLAM-style loop in one process: ``read_region`` per patch, convert, resize, per-patch
  ToTensor + Normalize, stack, then the encoder on the batch;
- pipeline: :func:`umeml.client.extract.pipeline.extract_slides` end to end on the slide
  (tissue segmentation, QC image, DataLoader readers overlapped with inference, h5 writing).

All three run in this process on the same synthetic 40x Aperio slide (JPEG tiles, levels 1/4/16,
0.25 um/px; patches of 256 px at 0.5 um, so 512 px read at level 0 and halved), with the same
encoder (random init: speed does not depend on the weights), batch size, device and precision.
Each is run ``--repeats`` times and the best time kept. Prints a markdown table; ``--json``
also writes the numbers.

    python bench/bench_extract.py                       # CPU: vit_tiny and resnet50_trunc
    python bench/bench_extract.py --patches 4096 --batch-size 256   # on a GPU box
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic slide writer

from slide_fixtures import write_large_svs  # noqa: E402

from torch.utils.data import DataLoader  # noqa: E402

from umeml.client.extract.encoders import Encoder, NormalizedEncoder, get_encoder_spec  # noqa: E402
from umeml.client.extract.grid import plan_read  # noqa: E402
from umeml.client.extract.pipeline import (  # noqa: E402
    ExtractOptions,
    PatchChunks,
    autocast_context,
    default_workers,
    extract_slides,
    resolve_device,
)
from umeml.client.extract.slides import open_slide, resolve_target  # noqa: E402

TILE = 256
MARGIN = 512
PATCH0 = 512  # level-0 pixels per patch (256 px at 0.5 um from a 0.25 um scan)


def make_slide(directory: Path, n_patches: int) -> tuple[Path, int]:
    """A slide whose tissue holds about ``n_patches`` patches; returns it and the exact count."""
    cols = max(1, math.ceil(math.sqrt(n_patches * 1.5)))
    rows = max(1, math.ceil(n_patches / cols))
    width, height = cols * PATCH0 + 2 * MARGIN, rows * PATCH0 + 2 * MARGIN
    path = write_large_svs(directory / "bench.svs", width, height, margin=MARGIN)
    return path, cols * rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def run_readers(slide_path: Path, coords, plan, out_size, workers: int, pin: bool) -> float:
    """Seconds for the pipeline's parallel patch reading alone (DataLoader workers, no encoder)."""
    t0 = time.perf_counter()
    loader = DataLoader(PatchChunks(slide_path, coords, plan, out_size, chunk_size=16), batch_size=None,
                        num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None)
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
            x_batch = torch.stack(tensors).to(device)
            raw(x_batch).float().cpu().numpy()
    osr.close()
    _sync(device)
    return time.perf_counter() - t0


def run_pipeline(encoder, slide_path: Path, out_dir: Path, batch, workers, device, precision) -> tuple[float, int]:
    """Seconds for extract_slides end to end, and the patches it wrote."""
    shutil.rmtree(out_dir, ignore_errors=True)
    opts = ExtractOptions(mpp=0.5, patch_size=256, batch_size=batch, num_workers=workers, device=str(device),
                          precision=precision, progress=False, overwrite=True)
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


def bench_encoder(name: str, slide_path: Path, n_patches: int, args, device: torch.device, workdir: Path) -> dict:
    encoder = random_encoder(name, device)
    model = NormalizedEncoder(encoder).to(device).eval()
    if encoder.spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    out_size = encoder.input_size or 256
    with open_slide(slide_path) as slide:
        plan = plan_read(slide, resolve_target(slide.resolution, slide_path, mpp=0.5), 256)
    # the pipeline's own grid, so all three modes see the same patches
    seconds, n = run_pipeline(encoder, slide_path, workdir / "warm", args.batch_size, args.workers, device, args.precision)
    from umeml.data.bags import read_coords

    coords = read_coords(workdir / "warm" / "bench.h5")
    assert len(coords) == n_patches == n, (len(coords), n_patches, n)
    # pre-decoded patches for the ceiling, read in parallel (not timed)
    loader = DataLoader(PatchChunks(slide_path, coords, plan, out_size, chunk_size=16), batch_size=None,
                        num_workers=max(1, args.workers))
    patches = torch.cat([chunk for chunk, _ in loader])
    # warm-up of the kernels (oneDNN / cuDNN autotuning) before any timing
    run_ceiling(model, patches[: args.batch_size], args.batch_size, device, args.precision)

    best = {"ceiling": math.inf, "readers": math.inf, "naive": math.inf, "pipeline": math.inf}
    for _ in range(args.repeats):
        best["readers"] = min(best["readers"], run_readers(slide_path, coords, plan, out_size, args.workers,
                                                           device.type == "cuda"))
        best["ceiling"] = min(best["ceiling"], run_ceiling(model, patches, args.batch_size, device, args.precision))
        best["naive"] = min(best["naive"], run_naive(model, encoder, slide_path, coords, plan, out_size,
                                                     args.batch_size, device, args.precision))
        t, _ = run_pipeline(encoder, slide_path, workdir / "run", args.batch_size, args.workers, device, args.precision)
        best["pipeline"] = min(best["pipeline"], t)
    rate = {k: n / v for k, v in best.items()}
    return {
        "encoder": name,
        "input_size": out_size,
        "patches": n,
        "patches_per_s": rate,
        "pipeline_vs_ceiling": rate["pipeline"] / rate["ceiling"],
        "pipeline_vs_naive": rate["pipeline"] / rate["naive"],
        # the best end-to-end rate possible is bounded by both the encoder and the readers
        "pipeline_vs_bound": rate["pipeline"] / min(rate["ceiling"], rate["readers"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default="vit_tiny,resnet50_trunc")
    p.add_argument("--patches", type=int, default=None,
                   help="patches in the slide (default: 384 for small encoders, scaled down for big ones on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    p.add_argument("--workers", type=int, default=None, help="reader processes (default: cores - 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads in this process (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 32
    if args.workers is None:
        args.workers = default_workers()
    torch.backends.cudnn.benchmark = True
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.encoders.split(","):
            n_req = args.patches or (96 if (device.type == "cpu" and name not in {"vit_tiny"}) else 384)
            slide_dir = workdir / name
            slide_dir.mkdir()
            slide_path, n = make_slide(slide_dir, n_req)
            t0 = time.perf_counter()
            res = bench_encoder(name, slide_path, n, args, device, slide_dir)
            res["bench_seconds"] = time.perf_counter() - t0
            results.append(res)
            r = res["patches_per_s"]
            print(f"{name}: ceiling {r['ceiling']:.1f}, readers {r['readers']:.1f}, naive {r['naive']:.1f}, "
                  f"pipeline {r['pipeline']:.1f} patches/s",
                  file=sys.stderr, flush=True)
    env["load_average_at_end"] = os.getloadavg()[0]
    print(f"\ndevice: {env['device']} ({env['cores']} cores, {env['torch_threads']} torch threads), "
          f"workers {env['workers']}, batch {env['batch_size']}, precision {env['precision']}, torch {env['torch']}, "
          f"load average {env['load_average_at_start']:.1f} -> {env['load_average_at_end']:.1f}\n")
    print("| encoder | input px | patches | encoder alone (ceiling) | readers alone | naive loop | pipeline "
          "| pipeline / ceiling | pipeline / min(ceiling, readers) | pipeline / naive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        r = res["patches_per_s"]
        print(f"| {res['encoder']} | {res['input_size']} | {res['patches']} | {r['ceiling']:.1f} | {r['readers']:.1f} | "
              f"{r['naive']:.1f} | {r['pipeline']:.1f} | {res['pipeline_vs_ceiling']:.2f}x | "
              f"{res['pipeline_vs_bound']:.2f}x | {res['pipeline_vs_naive']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
