"""Benchmark: seconds per bag of a training step without DP, with Opacus's DPOptimizer, and with
the fused DP optimizer (``umeml.train.dp_optimizer.FusedDPOptimizer``), the last with a site's
secure noise (the OS's CSPRNG) and with noise from a torch generator (what the secure draw costs).

The model is the demo config's (``configs/demo.yaml``: UMEML, d = 32) and, with ``--models``, the
``linear`` baseline; the data is the demo's synthetic cohort (4 sites x 60 patients, seed 0, the
demo's ``data.max_patches`` subsampling). Every variant trains a fresh copy of the same weights
with SGD on the same fixed batches (fixed size, not Poisson: the same work for every variant);
set-up (Opacus hooks) is outside the timer. Variants run interleaved, in rotating order, so load
on the machine hits all alike; best and median of ``--repeats`` are printed with the ratios to
non-DP, and the machine's load (``uptime``) before and after.

Usage: python -m bench.bench_dp_step [--batch-sizes 8 24] [--steps 6] [--repeats 7] [--threads 1]
           [--models umeml linear]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# "fused" is what a site runs (secure noise and sampling from the OS's CSPRNG); "fused, torch-generator
# noise" the same optimizer drawing from a seeded torch generator, to show what the secure draw costs
VARIANTS = ("non-DP", "Opacus DPOptimizer", "fused", "fused, torch-generator noise")


def demo_batches(batch_sizes: list[int], steps: int):
    """The demo config, its synthetic cohort's preprocessing (fitted on every patient) and
    ``steps`` training batches per size."""
    from umeml.config import load_config
    from umeml.data.cohort import load_data_dir
    from umeml.data.synth import SynthSpec, generate
    from umeml.train.experiment import make_dataset, prepare

    cfg = load_config(REPO / "configs" / "demo.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        generate(SynthSpec(sites=4, patients=60, seed=cfg.seed), Path(tmp) / "data")
        cohort = load_data_dir(Path(tmp) / "data", cfg.data)
        idx = np.arange(len(cohort))
        prep = prepare(cfg, cohort, idx)
        ds = make_dataset(cfg, cohort, idx, prep, train=True)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        # cycle through the shuffled patients: batch x steps may exceed the cohort
        batches = {b: [ds.collate([ds[order[j % len(ds)]] for j in range(s * b, (s + 1) * b)]) for s in range(steps)]
                   for b in batch_sizes}
    return cfg, prep, batches


def runner(variant: str, model: torch.nn.Module, batches, loss, batch_size: int):
    """A function timing one pass over ``batches`` with a fresh copy of ``model`` (set-up untimed)."""
    from umeml.train.dp import DPSGD
    from umeml.train.loop import batch_loss

    cpu = torch.device("cpu")

    def run() -> float:
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        if variant == "non-DP":
            t0 = time.perf_counter()
            for b in batches:
                opt.zero_grad(set_to_none=True)
                batch_loss(m, b, loss).mean().backward()
                opt.step()
            return time.perf_counter() - t0
        # fused: a site's secure noise from the OS's CSPRNG; Opacus's stock optimizer: its secure
        # construction on a torch generator (what Opacus does without torchcsprng)
        fused, secure = variant.startswith("fused"), variant != "fused, torch-generator noise"
        dp = DPSGD(m, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=float(batch_size),
                   secure_mode=secure, fused=fused,
                   generator=None if variant == "fused" else torch.Generator().manual_seed(0))
        try:
            t0 = time.perf_counter()
            for b in batches:
                dp.step(b, loss, cpu)
            return time.perf_counter() - t0
        finally:
            dp.close()

    return run


def measure(model, batches, loss, batch_size: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per bag of each variant, ``repeats`` interleaved passes (rotating order)."""
    runs = {v: runner(v, model, batches, loss, batch_size) for v in VARIANTS}
    for run in runs.values():  # warm-up: allocator, kernels, Opacus imports
        run()
    bags = sum(len(b) for b in batches)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            times[v].append(runs[v]() / bags)
    return times


def uptime() -> str:
    """The machine's load line (``uptime``), or why it is unavailable."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as err:
        return f"uptime unavailable: {err}"


def report(title: str, times: dict[str, list[float]]) -> None:
    """Markdown rows: best and median ms per bag, and the ratios to non-DP."""
    base_best, base_med = min(times["non-DP"]), statistics.median(times["non-DP"])
    print(f"\n{title}")
    print("| variant | best (ms/bag) | median (ms/bag) | best / non-DP | median / non-DP |")
    print("|---|---|---|---|---|")
    for v, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        print(f"| {v} | {1e3 * best:.2f} | {1e3 * med:.2f} | {best / base_best:.2f}x | {med / base_med:.2f}x |")
    o, f = times["Opacus DPOptimizer"], times["fused"]
    print(f"fused vs Opacus: best {min(o) / min(f):.2f}x faster, median {statistics.median(o) / statistics.median(f):.2f}x")
    g = times["fused, torch-generator noise"]
    print(f"secure (OS CSPRNG) vs torch-generator noise, fused: best {min(f) / min(g):.2f}x, "
          f"median {statistics.median(f) / statistics.median(g):.2f}x")


def main(argv: list[str] | None = None) -> int:
    """Time the three variants for every model and batch size; print markdown tables."""
    from umeml.model import build_model
    from umeml.model.parts import apply_trainable
    from umeml.train.loop import LossSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 24])
    p.add_argument("--steps", type=int, default=6, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["umeml", "linear"], help="model.name values (demo config otherwise)")
    p.add_argument("--trainable", default="all", help="train.trainable of every variant (all, heads, decoder)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load before: {uptime()}")
    cfg, prep, batches = demo_batches(args.batch_sizes, args.steps)
    loss = LossSettings(tuple(cfg.tasks), {}, cfg.survival.alpha)
    print(f"# DP-SGD step cost, demo cohort, torch threads={args.threads}, {args.steps} batches per pass, "
          f"{args.repeats} repeats, noise 1.0, clip 1.0, SGD; Opacus: its secure construction on a torch generator")
    for name in args.models:
        mcfg = cfg.model if name == cfg.model.name else type(cfg.model)(name=name)
        torch.manual_seed(0)
        model = build_model(mcfg, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
        apply_trainable(model, args.trainable)  # frozen parts: no gradients in any variant
        n_params, n_tensors = sum(q.numel() for q in model.parameters()), len(list(model.parameters()))
        for b in args.batch_sizes:
            patches = np.mean([float(x.patch_mask.sum()) / len(x) for x in batches[b]])
            times = measure(model, batches[b], loss, b, args.repeats)
            report(f"## {name} (trainable {args.trainable}): {n_params} parameters in {n_tensors} tensors, batch {b}, "
                   f"{patches:.0f} patches per bag", times)
    print(f"\nload after: {uptime()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
