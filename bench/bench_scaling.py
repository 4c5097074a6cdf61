"""Scaling: federated round time and memory vs number of sites; time and memory per bag vs bag size.

    python -m bench.bench_scaling [--sites 4 8 16 35] [--patients 12] [--rounds 3]
                                [--bag-sizes 1024 4096 16384 65536] [--feature-dim 1024]
                                [--skip-federation] [--skip-bags] [--write docs/benchmarks.md]

**Sites.** For every site count S a fresh subprocess generates a synthetic cohort of S sites x
``--patients`` patients (feature dim 64, median 300 patches per bag) and runs ``simulate()``
(configs/demo.yaml, one held-out site, S - 1 training sites, ``--rounds`` rounds, one local
epoch, every site evaluates every round). Round time = the coordinator's wall time per round
(``final.json`` ``seconds_per_round``: sampling, local training on every training site, aggregation,
evaluation on every site). Memory = the process tree (the Python process, Ray's GCS/raylet/
dashboard processes and its worker actors, all descendants), sampled every 0.5 s from /proc:
peak of the summed RSS (shared pages such as Ray's object store and shared libraries counted once
per process, so an over-estimate) and peak of the summed PSS (shared pages split between the
processes that map them: the better estimate of what the tree costs the machine). The largest single
process (``getrusage`` ``ru_maxrss`` of the process itself and of its reaped children) is also given.

**Bags.** For every bag size M a fresh subprocess builds the paper-size UMEML (d = 256, K = 5,
R = 3, 6 MCAT gene groups, three heads; as bench_train_step.py) with D = ``--feature-dim`` input
features, and measures one bag (batch of 1): a *train step* (forward + backward + AdamW step, full
bag, exact full-bag modularity loss, dropout on) and an *evaluation forward* (eval mode,
``torch.no_grad()``, full bag, modularity term computed as in evaluation). Peak extra memory = peak
RSS during the first (cold) call (``VmHWM`` reset through ``/proc/self/clear_refs``) minus RSS just
before it; the model and the input bag (M x D float32) exist before and are not counted. Time =
best and median wall time of the following calls, and the best CPU time (``time.process_time``,
all threads of the process: on a machine shared with other jobs this moves much less than wall time;
with 2 threads fully used, wall = CPU / 2). Note that training normally sees at most
``data.max_patches`` (default 4,096) patches per bag; evaluation always sees the full bag.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import resource
import statistics
import tempfile
import time
from pathlib import Path

from bench._harness import REPO, WORKER_FLAG, TreeMemory, command, emit, numbers, peak_extra, run_worker, status, write_section

MODULE = "bench.bench_scaling"
TITLE = "## Scaling: sites and bag size"


# ---------------------------------------------------------------- federated rounds vs sites

def sites_worker(sites: int, patients: int, rounds: int) -> dict:
    """One simulated federation with ``sites`` sites (run in a fresh process)."""
    from umeml.config import load_config
    from umeml.data.cohort import load_data_dir
    from umeml.data.source import CohortSource
    from umeml.data.synth import SynthSpec, generate
    from umeml.simulation import simulate

    base = load_config(REPO / "configs" / "demo.yaml")
    cfg = dataclasses.replace(
        base, seed=0, train=dataclasses.replace(base.train, bootstrap=50),
        federation=dataclasses.replace(base.federation, rounds=rounds, local_epochs=1, min_train_sites=1,
                                       k_min_patients=min(5, patients)))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        t0 = time.perf_counter()
        generate(SynthSpec(sites=sites, patients=patients, seed=0), data)
        gen_s = time.perf_counter() - t0
        cohort = load_data_dir(data, cfg.data)
        before = status()["VmRSS"]
        t0 = time.perf_counter()
        with TreeMemory() as mem, contextlib.redirect_stdout(io.StringIO()):
            final = simulate(cfg, cohort, CohortSource(data_dir=str(data)), Path(tmp) / "run")
        wall = time.perf_counter() - t0
    return {
        "sites": sites, "patients": len(cohort.patients), "train_sites": len(final["training_sites"]),
        "rounds": final["rounds"], "generate_s": gen_s, "wall_s": wall,
        "round_s": final["seconds_per_round"], "overhead_s": numbers(final.get("overhead_seconds_per_round")),
        "rss_before_mb": before / 2**20,
        "tree_peak_rss_mb": mem.peak_rss / 2**20, "tree_peak_pss_mb": mem.peak_pss / 2**20,
        "tree_peak_procs": mem.peak_procs,
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


# ---------------------------------------------------------------- time and memory per bag

def bag_worker(mode: str, m: int, feature_dim: int, repeats: int, threads: int) -> dict:
    """Peak extra memory of one cold call and best/median time of ``repeats`` calls."""
    import torch

    from bench.bench_train_step import GROUP_SIZES, HEADS, make_batch, step_fn
    from umeml.config import ModelConfig
    from umeml.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), feature_dim, GROUP_SIZES, HEADS)
    batch = make_batch(m, feature_dim)
    if mode == "train":
        call = step_fn(model, batch)
    else:
        model.eval()

        def call() -> float:
            with torch.no_grad():
                out = model(*batch.model_inputs())
            return float(out.aux_loss.sum())

    def cold_call() -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    peak, cold = peak_extra(cold_call)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"mode": mode, "m": m, "cold_s": cold, "best_s": min(times), "median_s": statistics.median(times),
            "cpu_best_s": min(cpu),
            "peak_extra_mb": peak / 2**20, "input_mb": m * feature_dim * 4 / 2**20,
            "params": sum(p.numel() for p in model.parameters())}


def _sub(*worker: str, timeout: float = 1200) -> dict:
    return run_worker(MODULE, WORKER_FLAG, *worker, timeout=timeout)


def sites_section(args) -> str:
    """Round time and memory per site count, one fresh process each; prints rows as they come."""
    lines = ["| sites (training + held out) | patients | round 1 s | later rounds s (mean) | wall s (Ray start included) "
             "| peak RSS, process tree MB | peak PSS, process tree MB | processes | largest process MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print(lines[0] + "\n" + lines[1], flush=True)
    for s in args.sites:
        r = _sub("sites", str(s), str(args.patients), str(args.rounds))
        later = r["round_s"][1:] or r["round_s"]
        lines.append(f"| {r['train_sites']} + {r['sites'] - r['train_sites']} | {r['patients']} | "
                     f"{r['round_s'][0]:.1f} | {statistics.mean(later):.1f} | {r['wall_s']:.0f} | "
                     f"{r['tree_peak_rss_mb']:,.0f} | {r['tree_peak_pss_mb']:,.0f} | {r['tree_peak_procs']} | "
                     f"{max(r['self_maxrss_mb'], r['children_maxrss_mb']):,.0f} |")
        print(lines[-1], flush=True)
    return (f"Federated rounds vs sites (synthetic, {args.patients} patients per site, feature dim 64, "
            f"{args.rounds} rounds, 1 local epoch, FedAvg, simulation):\n\n" + "\n".join(lines))


def bags_section(args) -> str:
    """Train-step and evaluation time and memory per bag size, one fresh process each."""
    lines = ["| M patches | bag MB (M x D fp32) | train step wall s (best / median) | train step CPU s (best) "
             "| train step peak extra MB | eval forward wall s (best / median) | eval forward CPU s (best) "
             "| eval forward peak extra MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n" + lines[0] + "\n" + lines[1], flush=True)
    for m in args.bag_sizes:
        reps = args.repeats if m < 65536 else max(1, args.repeats - 1)
        tr = _sub("bag", "train", str(m), str(args.feature_dim), str(reps), str(args.threads))
        ev = _sub("bag", "eval", str(m), str(args.feature_dim), str(args.repeats), str(args.threads))
        lines.append(f"| {m:,} | {tr['input_mb']:.0f} | {tr['best_s']:.3f} / {tr['median_s']:.3f} | "
                     f"{tr['cpu_best_s']:.3f} | {tr['peak_extra_mb']:,.0f} | {ev['best_s']:.3f} / {ev['median_s']:.3f} | "
                     f"{ev['cpu_best_s']:.3f} | {ev['peak_extra_mb']:,.0f} |")
        print(lines[-1], flush=True)
    return (f"Time and memory per bag (paper-size UMEML, {tr['params'] / 1e6:.2f} M parameters, "
            f"D = {args.feature_dim}, batch of one bag, {args.threads} torch threads):\n\n" + "\n".join(lines))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, nargs="+", default=[4, 8, 16, 35])
    p.add_argument("--patients", type=int, default=12, help="patients per site")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bag-sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--feature-dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per bag size (after the cold call)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-federation", action="store_true")
    p.add_argument("--skip-bags", action="store_true")
    p.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    p.add_argument(WORKER_FLAG, nargs="+", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts, print their tables, optionally write them as a section."""
    args = _parser().parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "sites":
            return emit(sites_worker(int(rest[0]), int(rest[1]), int(rest[2])))
        return emit(bag_worker(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4])))
    t_all = time.perf_counter()
    sections = []
    if not args.skip_federation:
        sections.append(sites_section(args))
    if not args.skip_bags:
        sections.append(bags_section(args))
    total = (time.perf_counter() - t_all) / 60
    print(f"\ntotal {total:.1f} min")
    if args.write and sections:
        write_section(args.write, TITLE, f"Command: `{command(MODULE, argv)}` ({total:.0f} min).\n\n"
                      + "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
