"""Benchmark: the share of the task gradient that the modularity term carries, per (tau, gamma).

    python -m bench.bench_modularity_share [--taus 1.0 0.5 0.2 0.1] [--gammas 0.1 1 2 5]
                                           [--train-epochs 2] [--clustered] [--write docs/benchmarks.md]

UMEML's loss is ``L = L_task + gamma L_mod`` (design 5.5). The figure that says whether the
modularity term does anything is the ratio of gradient norms over all model parameters,
``share = ||grad(gamma L_mod)|| / ||grad(L_task)||``, measured on training batches of the demo
experiment (``configs/demo.yaml``: hidden 32, K = 5, batch 8) on a synthetic cohort (4 sites x
60 patients; ``--clustered`` for spatially clustered morphotypes). Both gradients are taken on the
same forward pass (``torch.autograd.grad`` of each term separately), batch by batch over one
pass of the training split; the table gives the median and the 10-90% range over batches.

- *at init*: the freshly initialised model (same seed for every setting). ``L_mod`` does not
  depend on gamma, so at init the share scales exactly with gamma.
- *trained*: after ``--train-epochs`` epochs of training with that (tau, gamma), so the
  prototypes have moved (sharper assignments change both terms).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._harness import REPO, write_section

TITLE = "## Modularity loss: share of the task gradient"


def _cohort(tmp: Path, clustered: bool, seed: int):
    from umeml.data.cohort import load_data_dir
    from umeml.data.synth import SynthSpec, generate

    generate(SynthSpec(sites=4, patients=60, seed=seed, clustered=clustered), tmp / "data")
    return load_data_dir(tmp / "data")


def _grad_norm(values, params) -> float:
    import torch

    grads = torch.autograd.grad(values, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def batch_shares(model, loader, loss) -> list[float]:
    """``||grad gamma L_mod|| / ||grad L_task||`` of every non-empty batch of ``loader``."""
    from umeml.train.losses import task_loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    shares = []
    for batch in loader:
        if len(batch) == 0:
            continue
        out = model(*batch.model_inputs())
        aux = out.aux_loss.mean()
        task = task_loss(dataclasses.replace(out, aux_loss=out.aux_loss * 0), batch, loss.tasks, loss.weights,
                         loss.survival_alpha).mean()
        g_task = _grad_norm(task, params)
        shares.append(_grad_norm(aux, params) / g_task if aux.requires_grad else 0.0)
    return shares


def measure(cfg, cohort, train_epochs: int) -> dict:
    """Shares at init and after ``train_epochs`` epochs (median, 10% and 90% over batches)."""
    import torch

    from umeml.data.dataset import make_loader
    from umeml.data.splits import make_split
    from umeml.train.experiment import build_model, loss_settings, make_dataset, prepare
    from umeml.train.loop import cosine_with_warmup, make_optimizer, train_epoch

    split = make_split(cohort, (), cfg.split.n_test_sites, cfg.split.val_fraction, cfg.seed)
    prep = prepare(cfg, cohort, split.train)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, prep)
    ds = make_dataset(cfg, cohort, split.train, prep, train=True)
    loader = make_loader(ds, cfg.train.batch_size, True, cfg.seed)
    loss = loss_settings(cfg, prep)
    result = {"init": batch_shares(model, loader, loss)}
    if train_epochs:
        opt = make_optimizer(model, cfg.train)
        steps = -(-len(ds) // cfg.train.batch_size)
        sched = cosine_with_warmup(opt, cfg.train.warmup_epochs * steps, cfg.train.epochs * steps)
        for epoch in range(train_epochs):
            ds.set_epoch(epoch + 1)
            train_epoch(model, loader, opt, loss, torch.device("cpu"), sched)
        result["trained"] = batch_shares(model, loader, loss)
    return {k: (float(np.median(v)), float(np.quantile(v, 0.1)), float(np.quantile(v, 0.9))) for k, v in result.items()}


def _fmt(entry) -> str:
    med, lo, hi = entry
    return f"{med:.2g} ({lo:.2g}-{hi:.2g})"


def run(taus, gammas, train_epochs: int, clustered: bool, seed: int, log=print) -> list[dict]:
    """One row per (tau, gamma): the shares at init and trained."""
    import torch

    from umeml.config import load_config

    torch.set_num_threads(1)
    base = load_config(REPO / "configs" / "demo.yaml")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cohort = _cohort(Path(tmp), clustered, seed)
        for tau in taus:
            for gamma in gammas:
                cfg = dataclasses.replace(base, seed=seed, model=dataclasses.replace(base.model, tau=tau, gamma=gamma))
                t0 = time.perf_counter()
                shares = measure(cfg, cohort, train_epochs)
                rows.append({"tau": tau, "gamma": gamma, **shares})
                log(f"tau {tau:<5} gamma {gamma:<5} " + "  ".join(f"{k} {_fmt(v)}" for k, v in shares.items())
                    + f"  ({time.perf_counter() - t0:.0f} s)")
    return rows


def table(rows: list[dict], train_epochs: int) -> str:
    """Markdown table of the shares."""
    cols = ["init"] + (["trained"] if train_epochs else [])
    head = "| tau | gamma | " + " | ".join(
        f"share {c}" + (f" ({train_epochs} epochs)" if c == "trained" else "") + ", median (10-90%)" for c in cols) + " |"
    lines = [head, "| --- | --- |" + " --- |" * len(cols)]
    for r in rows:
        lines.append(f"| {r['tau']} | {r['gamma']} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Measure, print, optionally write the section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.1, 1.0, 2.0, 5.0])
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--clustered", action="store_true", help="spatially clustered morphotypes (SynthSpec.clustered)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    args = ap.parse_args(argv)
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.perf_counter()
    rows = run(args.taus, args.gammas, args.train_epochs, args.clustered, args.seed,
               log=lambda s: print(s, flush=True))
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    text = table(rows, args.train_epochs)
    print(text)
    print(f"load average before / after: {' '.join(load0)} / {' '.join(load1)}; {time.perf_counter() - t0:.0f} s")
    if args.write:
        cmd = ("python -m bench.bench_modularity_share --taus " + " ".join(map(str, args.taus)) + " --gammas "
               + " ".join(map(str, args.gammas)) + f" --train-epochs {args.train_epochs}" + " --clustered" * args.clustered)
        write_section(args.write, TITLE, f"Command: `nice -n 5 {cmd}` (1 torch thread; load average before / after "
                      f"{' '.join(load0)} / {' '.join(load1)}).\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
