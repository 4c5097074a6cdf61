"""Privacy benchmarks: what local DP-SGD costs in time per bag and in held-out accuracy.

    python -m bench.bench_privacy [--epsilons inf 8 4 1] [--skip-cost] [--skip-utility] [--write docs/benchmarks.md]

1. Cost: seconds per bag of a UMEML training step with Opacus DP-SGD (per-sample gradients,
   clipping, secure noise: what a site runs) against the same step without DP, on the same
   batches of the synthetic demo cohort, in this process (goal: <= 2x).
2. Privacy-utility: simulated federations (Flower's simulation engine) of configs/demo.yaml
   (synthetic, 4 sites) and configs/gbmlgg_genomics.yaml (TCGA GBM-LGG genomics, 8 training
   sites) with local DP at every site at epsilon in {inf, 8, 4, 1}: held-out metrics (pooled over
   the held-out sites, 95% CI) and the largest epsilon any site spent; each DP budget once with
   the config's own optimizer (AdamW) and once with SGD + momentum and a larger batch, which
   suits DP-SGD better (--dp-sgd-lr, --dp-sgd-batch; --no-dp-sgd to skip).
3. ``--recipe`` (issue 17, bench/_privacy_recipe.py): the DP recipe's grid, epsilon x {UMEML from
   scratch, public checkpoint + heads / decoder, linear}, each DP row next to its identical run
   without DP, the public checkpoint alone and the non-DP federated reference, on the synthetic
   world and on GBM-LGG genomics (``--worlds``), several seeds, paired per-seed differences,
   bootstrap CIs at epsilon 1 and the goals. Rows are printed as JSON lines; runs split over
   processes are summarised with ``--recipe-rows LOG...``.
4. ``--tune JSON...``: recipe candidates (overrides) at epsilon 8, scored on the training sites'
   validation splits only (the held-out metrics are not printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._harness import PRIMARY, REPO, TCGA, command, metric_entry, write_section

MODULE = "bench.bench_privacy"
TITLE = "## Privacy: DP-SGD cost and privacy-utility"
RECIPE_TITLE = "## Privacy: the DP recipe, public initialisation + private fine-tuning (issue 17)"
VERSUS_TITLE = "## Privacy: the DP recipe under another setting, paired with the recipe's runs (issue 17)"
METRICS = PRIMARY


def step_cost(steps: int, batch_size: int, repeats: int) -> dict:
    """Seconds per bag of a training step without and with DP-SGD (the default, fused optimizer)
    on identical batches: :mod:`bench.bench_dp_step`'s batches and interleaved timing."""
    from bench.bench_dp_step import demo_batches, measure
    from umeml.model import build_model
    from umeml.train.experiment import loss_settings

    cfg, prep, batches = demo_batches([batch_size], steps)
    torch.manual_seed(0)
    model = build_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
    times = measure(model, batches[batch_size], loss_settings(cfg, prep), batch_size, repeats)
    per_bag = {"plain": min(times["non-DP"]), "dp": min(times["fused"])}
    mean_patches = float(np.mean([int(b.patch_mask.sum()) / len(b) for b in batches[batch_size]]))
    return {"per_bag_plain_ms": 1e3 * per_bag["plain"], "per_bag_dp_ms": 1e3 * per_bag["dp"],
            "ratio": per_bag["dp"] / per_bag["plain"], "bags": steps * batch_size, "batch_size": batch_size,
            "mean_patches": mean_patches, "hidden_dim": cfg.model.hidden_dim}


def utility(name: str, epsilons: list[float], work: Path, dp_sgd: tuple[float, int] | None) -> list[dict]:
    """Held-out metrics of one config's simulated federation at each epsilon (inf = no DP)."""
    from umeml.config import load_config
    from umeml.data.cohort import load_cohort, load_data_dir
    from umeml.data.source import CohortSource
    from umeml.data.synth import SynthSpec, generate
    from umeml.server.cli import with_local_dp
    from umeml.simulation import simulate

    base = load_config(REPO / "configs" / f"{name}.yaml")
    if name == "demo":
        data = work / "demo-data"
        generate(SynthSpec(sites=4, patients=60, seed=base.seed), data, overwrite=True)
        cohort, source = load_data_dir(data, base.data), CohortSource(data_dir=str(data))
    else:
        table, sig = TCGA / "tcga_gbmlgg_all_clean.csv.gz", TCGA / "signatures.csv"
        cohort = load_cohort(table, sig, None, base.data)
        source = CohortSource(table=str(table), signatures=str(sig))
    rows = []
    runs = [(eps, "config", base if math.isinf(eps) else with_local_dp(base, eps)) for eps in epsilons]
    if dp_sgd is not None:  # the same budgets with an optimizer tuned for DP-SGD
        lr, batch = dp_sgd
        tuned = dataclasses.replace(base, train=dataclasses.replace(base.train, optimizer="sgd", lr=lr, batch_size=batch))
        runs += [(eps, f"sgd lr {lr:g}, batch {batch}", with_local_dp(tuned, eps)) for eps in epsilons if not math.isinf(eps)]
    for eps, train_label, cfg in runs:
        t0 = time.perf_counter()
        final = simulate(cfg, cohort, source, work / f"{name}-eps{eps:g}-{len(rows)}")
        res = final["pooled"] or final["held_out_combined"]
        ledger = final.get("privacy") or {}
        spent = ledger.get("local_max_epsilon")
        row = {"config": name, "train": train_label, "epsilon": eps, "spent": spent, "wall_s": time.perf_counter() - t0,
               "n": sum(r.get("n") or 0 for r in final["held_out"].values())}
        for task, key in METRICS:
            m = metric_entry(res, task, key) or {}
            row[f"{task}_{key}"] = (m.get("value"), m.get("ci_low"), m.get("ci_high"))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    """One markdown table row of the privacy-utility table."""
    cells = []
    for task, key in METRICS:
        v, lo, hi = row[f"{task}_{key}"]
        cells.append("-" if v is None else f"{v:.3f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{v:.3f}")
    eps = "inf (no DP)" if math.isinf(row["epsilon"]) else f"{row['epsilon']:g}"
    spent = "-" if row["spent"] is None else f"{row['spent']:.2f}"
    return (f"| {row['config']} | {row['train']} | {eps} | {spent} | {row['n']} | " + " | ".join(cells)
            + f" | {row['wall_s']:.0f} s |")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 8.0, 4.0, 1.0])
    ap.add_argument("--configs", nargs="+", default=["demo", "gbmlgg_genomics"], choices=["demo", "gbmlgg_genomics"])
    ap.add_argument("--steps", type=int, default=12, help="training steps per timing (cost)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dp-sgd-lr", type=float, default=0.1, help="lr of the extra DP rows with SGD + momentum")
    ap.add_argument("--dp-sgd-batch", type=int, default=24, help="batch size of the extra DP rows with SGD")
    ap.add_argument("--no-dp-sgd", action="store_true", help="only the configs' own optimizer under DP")
    ap.add_argument("--recipe", action="store_true",
                    help="the DP recipe's grid instead (public init + named part, bench/_privacy_recipe.py)")
    ap.add_argument("--worlds", nargs="+", default=["synthetic", "gbmlgg"], choices=["synthetic", "gbmlgg"],
                    help="worlds of --recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="experiment seeds of --recipe")
    ap.add_argument("--variants", nargs="+", help="rows of --recipe (default all)")
    ap.add_argument("--no-reference", action="store_true", help="--recipe without the non-DP reference rows")
    ap.add_argument("--override", type=json.loads, default=None,
                    help="JSON overrides of the recipe for --recipe / --tune (rounds, trainable, dp_recipe keys)")
    ap.add_argument("--tune", nargs="+", metavar="JSON",
                    help="tuning pass: each JSON a set of overrides, run at epsilon 8; prints only the training "
                         "sites' validation metrics (the held-out sites stay unseen)")
    ap.add_argument("--tune-epsilon", type=float, default=8.0, help="the target epsilon of --tune's runs")
    ap.add_argument("--notes", type=Path, help="with --recipe and --write: markdown appended to the section (how it was run)")
    ap.add_argument("--tune-rows", type=Path, nargs="+", help="with --recipe: add the tuning pass these --tune logs hold")
    ap.add_argument("--recipe-rows", type=Path, nargs="+",
                    help="summarise the rows that --recipe runs printed (one log per process) instead of running")
    ap.add_argument("--goal-variant", default="umeml public + decoder", help="the rows the goals are judged on")
    ap.add_argument("--before-rows", type=Path, nargs="+",
                    help="with --recipe-rows: logs of the same grid under the recipe as shipped; writes the section "
                         f"'{VERSUS_TITLE[3:]}' (the --recipe-rows grid, its paired differences from these rows, goals)")
    ap.add_argument("--setting", default="", help="with --before-rows: what the --recipe-rows grid changed (a phrase)")
    ap.add_argument("--before-setting", default="the recipe as shipped",
                    help="with --before-rows: what those rows ran (a phrase; default: the recipe as shipped)")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-utility", action="store_true")
    ap.add_argument("--write", type=Path, help=f"replace the section '{TITLE[3:]}' of this markdown file")
    return ap


def cost_part(args) -> str:
    """The DP-SGD cost subsection (prints its row)."""
    c = step_cost(args.steps, args.batch_size, args.repeats)
    line = (f"| UMEML (demo config, hidden {c['hidden_dim']}), {c['bags']} bags in batches of {c['batch_size']}, "
            f"{c['mean_patches']:.0f} patches per bag | {c['per_bag_plain_ms']:.1f} ms | {c['per_bag_dp_ms']:.1f} ms | "
            f"{c['ratio']:.2f}x |")
    print(line, flush=True)
    return ("### DP-SGD cost per bag (same batches, best of "
            f"{args.repeats}; goal <= 2x)\n\n| setup | no DP | DP-SGD (fused optimizer, secure noise) | ratio |\n"
            "| --- | --- | --- | --- |\n" + line + "\n")


def utility_part(args) -> str:
    """The privacy-utility subsection (prints its rows as they come)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            if name == "gbmlgg_genomics" and not TCGA.is_dir():
                print(f"skipping gbmlgg_genomics: {TCGA} is absent", file=sys.stderr)
                continue
            rows += utility(name, args.epsilons, Path(tmp), None if args.no_dp_sgd else (args.dp_sgd_lr, args.dp_sgd_batch))
    header = ("| config | local training | target epsilon | spent (max over sites) | held-out n | grade auc_macro | "
              "subtype auc_macro | survival c_index | wall |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    return ("### Privacy-utility (local DP-SGD at every site, delta 1e-5, clipping 1.0)\n\n"
            + header + "\n".join(format_row(r) for r in rows) + "\n")


def _work() -> Path:
    return Path(os.environ.get("UMEML_BENCH_WORK") or tempfile.mkdtemp(prefix="umeml-dp-recipe-"))


def tune_part(args) -> None:
    """The tuning pass: validation metrics of each override set at ``--tune-epsilon`` (8 unless
    set; held-out never shown)."""
    from bench import _privacy_recipe as recipe

    work = _work()
    for name in args.worlds:
        world = recipe.WORLDS[name](work)
        for text in args.tune:
            over = json.loads(text)
            for seed in args.seeds:
                for variant in args.variants or ["umeml public + heads"]:
                    model = "linear" if recipe.public_of(variant) == recipe.PUBLIC_LINEAR else "umeml"
                    public, _ = recipe.public_checkpoint(world, seed, work, model, recipe.model_overrides(over))
                    eps = args.tune_epsilon
                    cfg = recipe.variant_config(world, variant, eps, seed, public, over)
                    cfg = dataclasses.replace(cfg, name=cfg.name + "-tune-" + "".join(c for c in text if c.isalnum()))
                    row = recipe.run_one(world, cfg, variant, eps, seed, work)
                    val = {k: round(v, 3) for k, v in row.items() if k.startswith("val_") and v is not None}
                    at = {} if eps == 8.0 else {"epsilon": eps}  # rows of earlier passes (all at 8) carry none
                    print(json.dumps({"tune": over, "world": name, "variant": variant, "seed": seed, **at, **val,
                                      "spent": row["spent"], "wall_s": row["wall_s"], "load": row["load"]}), flush=True)


def recipe_part(args) -> str:
    """The DP recipe's privacy-utility grid (mean ± sd over seeds; rows printed as they come)."""
    from bench import _privacy_recipe as recipe

    if args.recipe_rows:  # rows printed by earlier --recipe processes (e.g. one per seed, run side by side)
        rows = recipe.unique_rows([r for log in args.recipe_rows for r in recipe.read_rows(log)])
    else:
        work, rows = _work(), []
        for name in args.worlds:
            if name == "gbmlgg" and not TCGA.is_dir():
                print(f"skipping gbmlgg: {TCGA} is absent", file=sys.stderr)
                continue
            rows += recipe.run_grid(recipe.WORLDS[name](work), args.epsilons, args.seeds, work,
                                    tuple(args.variants or recipe.VARIANTS), reference=not args.no_reference,
                                    overrides=args.override, log=lambda r: print(json.dumps(r), flush=True))
    loads = [r["load"] for r in rows] or [float("nan")]
    header = ("| world | rows | target epsilon | spent (max over sites) | seeds | grade auc_macro | subtype auc_macro | "
              "survival c_index | wall per run | 1-min load |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    paired = ("| world | rows | epsilon | minus | seeds | grade auc_macro | subtype auc_macro | survival c_index |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    cis = ("| world | rows | seed | grade auc_macro [95% CI] | subtype auc_macro [95% CI] | survival c_index [95% CI] |\n"
           "| --- | --- | --- | --- | --- | --- |\n")
    return (f"### DP recipe: public init + private fine-tuning (1-min load average {min(loads):.1f}-{max(loads):.1f})\n\n"
            + recipe_setup(args) + header + "\n".join(recipe.format_summary(s) for s in recipe.summarise(rows))
            + "\n\nPaired per-seed differences (mean ± sd over seeds):\n\n" + paired
            + "\n".join(recipe.paired_rows(rows))
            + "\n\nEpsilon 1, per seed, held-out value and bootstrap 95% CI (200 resamples of the held-out "
              "patients):\n\n" + cis + "\n".join(recipe.ci_rows(rows))
            + f"\n\nGoals ({args.goal_variant}: the recipe of configs/demo_dp.yaml; the other rows for comparison):\n\n"
            + "\n".join(line for v in (args.goal_variant, *[v for v in recipe.VARIANTS if v != args.goal_variant])
                         for line in recipe.goal_lines(rows, v) if "not measured" not in line or v == args.goal_variant)
            + "\n" + tune_section(args))


def versus_title(args) -> str:
    """The section a ``--before-rows`` comparison writes: its own per ``--before-setting`` other
    than the shipped recipe (so comparing against an earlier default never replaces the section
    of another comparison), else :data:`VERSUS_TITLE`."""
    if args.before_setting == "the recipe as shipped":
        return VERSUS_TITLE
    return f"## Privacy: the DP recipe, {args.setting or 'a changed setting'} vs {args.before_setting} (issue 17)"


def versus_part(args) -> str:
    """The grid of ``--recipe-rows`` (a setting changed) against ``--before-rows`` (the recipe as
    shipped, same seeds): both grids, paired per-seed differences, the goals of the new grid."""
    from bench import _privacy_recipe as recipe

    if not args.recipe_rows:
        raise SystemExit("--before-rows needs --recipe-rows (the grid under the changed setting)")
    before = recipe.unique_rows([r for log in args.before_rows for r in recipe.read_rows(log)])
    after = recipe.with_shared_rows([r for log in args.recipe_rows for r in recipe.read_rows(log)], before)
    before_goals = recipe.with_shared_rows(before, after)  # against the reference either grid ran
    loads = [r["load"] for r in after + before] or [float("nan")]
    header = ("| world | rows | target epsilon | spent (max over sites) | seeds | grade auc_macro | subtype auc_macro | "
              "survival c_index | wall per run | 1-min load |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    paired = ("| world | rows | epsilon | seeds | grade auc_macro | subtype auc_macro | survival c_index |\n"
              "| --- | --- | --- | --- | --- | --- | --- |\n")
    variants = [v for v in recipe.VARIANTS if any(r["variant"] == v for r in after)]
    then = args.before_setting
    return (f"### {args.setting or 'changed setting'} vs {then} (1-min load average "
            f"{min(loads):.1f}-{max(loads):.1f})\n\n" + recipe_setup(args)
            + f"With {args.setting or 'the changed setting'}:\n\n" + header
            + "\n".join(recipe.format_summary(s) for s in recipe.summarise(after))
            + f"\n\nWith {then}, the same seeds:\n\n" + header
            + "\n".join(recipe.format_summary(s) for s in recipe.summarise(before))
            + f"\n\nPaired per-seed differences, {args.setting or 'changed'} minus {then} (mean ± sd over seeds):"
              "\n\n" + paired + "\n".join(recipe.versus_rows(after, before))
            + f"\n\nGoals with {args.setting or 'the changed setting'}:\n\n"
            + "\n".join(line for v in variants for line in recipe.goal_lines(after, v))
            + f"\n\nGoals with {then}, the same seeds:\n\n"
            + "\n".join(line for v in variants for line in recipe.goal_lines(before_goals, v)) + "\n")


def tune_section(args) -> str:
    """The tuning pass's subsection (``--tune-rows``): validation only, at epsilon 8."""
    from bench import _privacy_recipe as recipe

    if not args.tune_rows:
        return ""
    rows = [r for log in args.tune_rows for r in recipe.read_tune_rows(log)]
    return ("\n### Tuning pass (epsilon 8, the training sites' validation splits only; held-out metrics not looked at)"
            "\n\n`python -m bench.bench_privacy --tune JSON... --worlds synthetic --seeds ... --variants ...`: "
            "overrides of configs/demo_dp.yaml's recipe; metrics are the mean over the three private sites' "
            "validation splits (12 patients each) and over seeds, best first.\n\n"
            "| world | rows | overrides | seeds | grade auc_macro | subtype auc_macro | survival c_index | mean | "
            "1-min load |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(recipe.tune_table(rows)) + "\n")


def recipe_setup(args) -> str:
    """The grid's setup paragraph, from the recipe's config."""
    from bench import _privacy_recipe as recipe
    from umeml.config import load_config

    cfg = load_config(REPO / "configs" / "demo_dp.yaml")
    r, dp = cfg.federation.dp_recipe, cfg.federation.local_dp
    over = f" Overrides of this grid: `{json.dumps(args.override)}`." if args.override else ""
    return (f"Recipe (configs/demo_dp.yaml): SGD lr {r.lr:g} momentum {r.momentum:g}, Poisson batches of "
            f"expected size {r.batch_fraction:g} x the site's training patients, {r.local_steps} step(s) per round, "
            f"{cfg.federation.rounds} rounds, {cfg.federation.strategy} server momentum "
            f"{cfg.federation.server_momentum:g}, clip {dp.max_grad_norm:g}, delta {dp.delta:g}, accountant "
            f"{dp.accountant}, noise calibrated for rounds x steps; trainable part per row.{over} The "
            "'inf (no DP)' rows are the identical runs without DP (`dp_recipe.apply_without_dp`: same optimizer, "
            "batches, steps, rounds, server momentum, initialisation and trainable part; no clipping, no noise). "
            "Reference: the non-DP federated run as shipped (synthetic: configs/demo.yaml; GBM-LGG: "
            "configs/gbmlgg_federated.yaml), from scratch, all trainable, on the same private sites. Synthetic: "
            f"`SynthSpec(sites=7, patients=60, seed=0)`, private A0-A2, held-out A3, public A4-A6 whose bags are "
            f"the same world's generated with stain shift {recipe.PUBLIC_STAIN:g} (demo: 0.4), so the public "
            "checkpoint has seen another stain and the generator's per-site label mix of A4-A6; bags cut to "
            f"{recipe.MAX_PATCHES} patches. GBM-LGG genomics: held-out E1, CS, 27; private the 8 TSS sites of "
            "configs/gbmlgg_genomics.yaml; public every other TSS site, trained centrally with "
            "configs/gbmlgg_federated.yaml's model and train settings. Metrics pooled over the held-out "
            "patients; federations in-process (`bench/_inprocess.py`), 1 torch thread.\n\n")


def main(argv=None) -> int:
    """Run the benchmarks, print the tables, optionally write them as a section of a markdown file."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(1 if args.recipe or args.tune else max(1, min(2, os.cpu_count() or 1)))
    parts = []
    if args.tune:
        tune_part(args)
        return 0
    if args.recipe and args.before_rows:
        parts.append(versus_part(args) + ("\n" + args.notes.read_text() if args.notes else ""))
    elif args.recipe:
        parts.append(recipe_part(args) + ("\n" + args.notes.read_text() if args.notes else ""))
    elif not args.skip_cost:
        parts.append(cost_part(args))
    if not args.skip_utility and not args.recipe:
        parts.append(utility_part(args))
    if args.write and parts:
        title = (versus_title(args) if args.before_rows else RECIPE_TITLE) if args.recipe else TITLE
        write_section(args.write, title, f"Command: `{command(MODULE, argv)}`\n\n" + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
