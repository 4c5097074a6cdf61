"""TCGA GBM-LGG (genomics only), site-disjoint 5-fold benchmark: classical peers, SNN, UMEML
centralized, UMEML federated (FedAvg, FedProx) and UMEML local-only on the same folds.

    python -m bench.bench_gbmlgg [--folds 0 1] [--out DIR] [--write docs/benchmarks.md]

Folds come from ``umeml.data.splits.site_kfold`` over the TSS sites (seed of the config); the
fold's sites are held out of everything that trains. Per fold:

- classical: standardised genomic features -> PCA (fit on the training patients) -> standardised
  components; multinomial L2 logistic regression (scikit-learn, balanced class weights) for grade
  and subtype, Cox proportional hazards (lifelines, small L2 penalizer) for survival;
- ``snn`` and ``umeml`` trained centrally (``train_central`` with an explicit Split: training
  patients = the training folds, test = the held-out fold);
- UMEML federated with FedAvg and FedProx (``simulate`` with the fold's sites held out; training
  TSS sites with fewer than 2 * k_min_patients patients merged into pseudo-institutions
  ``merged-1``, ``merged-2``, ... of >= that many patients, through a generated data.site_map);
- local-only: UMEML trained centrally on the largest training site alone.

Every method is scored on all held-out patients of the fold pooled (federated: the coordinator's
pooled evaluation). Per-fold raw results go to ``OUT/results.json``; the printed table (mean and
sd over folds) is what ``--write`` puts into the markdown file, replacing an earlier section.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._harness import PRIMARY, REPO, metric_entry, stamp, write_section
from bench._harness import TCGA as DATA

CONFIG = REPO / "configs" / "gbmlgg_folds.yaml"
EXTRA = (("grade", "balanced_accuracy"), ("subtype", "balanced_accuracy"))
METRICS = PRIMARY + EXTRA
METHODS = ("classical", "snn central", "umeml central", "umeml fedavg", "umeml fedprox", "umeml local-only")
SECTION = "## TCGA GBM-LGG, site-disjoint 5-fold"


def label(task: str, key: str) -> str:
    """The column name of one metric (``grade bal_acc`` for balanced accuracy)."""
    return f"{task} {'bal_acc' if key == 'balanced_accuracy' else key}"


def merge_small_sites(sizes: dict[str, int], train_sites: list[str], min_patients: int) -> dict[str, str]:
    """``code -> merged-k`` for the training sites below ``min_patients``: sorted by code, filled
    in order into groups of >= ``min_patients`` patients; a remainder joins the last group."""
    small = sorted(s for s in train_sites if sizes[s] < min_patients)
    groups: list[list[str]] = []
    current, total = [], 0
    for s in small:
        current.append(s)
        total += sizes[s]
        if total >= min_patients:
            groups.append(current)
            current, total = [], 0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return {s: f"merged-{k + 1}" for k, group in enumerate(groups) for s in group}


def metrics_of(test: dict) -> dict:
    """{"grade auc_macro": {"value", "ci_low", "ci_high", "n"}, ...} from a metrics dict."""
    return {label(t, k): metric_entry(test, t, k) for t, k in METRICS}


def classical(cohort, pool: np.ndarray, test: np.ndarray, n_pcs: int, c_reg: float, penalizer: float,
              n_boot: int, seed: int) -> dict:
    """Logistic regression (grade, subtype) and Cox PH (survival) on standardised PCs."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from umeml.metrics import classification_metrics, survival_metrics

    x = cohort.genomics.astype(np.float64)
    scale = StandardScaler().fit(x[pool])
    pca = PCA(n_components=min(n_pcs, len(pool) - 1), random_state=seed).fit(scale.transform(x[pool]))
    z_pool, z_test = (pca.transform(scale.transform(x[i])) for i in (pool, test))
    zs = StandardScaler().fit(z_pool)
    z_pool, z_test = zs.transform(z_pool), zs.transform(z_test)
    out = {}
    for task, classes, index in (("grade", cohort.grades, cohort.grade_index),
                                 ("subtype", cohort.subtypes, cohort.subtype_index)):
        y_pool = np.array([index(i) for i in pool])
        y_test = np.array([index(i) for i in test])
        clf = LogisticRegression(C=c_reg, class_weight="balanced", max_iter=5000).fit(z_pool, y_pool)
        probs = np.zeros((len(test), len(classes)))
        probs[:, clf.classes_] = clf.predict_proba(z_test)
        out[task] = classification_metrics(y_test, probs, n_boot=n_boot, seed=seed)
    cols = [f"pc{j}" for j in range(z_pool.shape[1])]
    t_pool, e_pool = cohort.times_events(pool)
    frame = pd.DataFrame(z_pool, columns=cols).assign(T=np.maximum(t_pool, 1e-3), E=e_pool)
    cph = CoxPHFitter(penalizer=penalizer).fit(frame, duration_col="T", event_col="E")
    risk = np.asarray(cph.predict_log_partial_hazard(pd.DataFrame(z_test, columns=cols))).reshape(-1)
    t_test, e_test = cohort.times_events(test)
    out["survival"] = survival_metrics(t_test, 1 - e_test, risk, n_boot=n_boot, seed=seed)
    return out


@dataclasses.dataclass
class Fold:
    """One fold, ready to train on: config with its site map, cohort, splits, and its record."""

    k: int
    dir: Path
    cfg: object  # ExperimentConfig with this fold's data.site_map
    cohort: object
    pool: np.ndarray  # training patients (train + validation)
    split: object  # Split: training folds / held-out fold
    local_split: object  # Split: the largest training institution alone / held-out fold
    institutions: list[str]
    record: dict


def prepare_fold(k: int, fold_sites: list[str], base_cfg, base_cohort, args, out: Path) -> Fold:
    """Merge the small training sites (a generated site map), reload the cohort with it, split."""
    from umeml.data.cohort import load_cohort
    from umeml.data.splits import Split, stratified_train_val

    fold_dir = out / f"fold{k}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    sizes = {s: len(base_cohort.site_indices(s)) for s in base_cohort.sites}
    train_codes = [s for s in base_cohort.sites if s not in fold_sites]
    min_site = args.min_site_patients or 2 * base_cfg.federation.k_min_patients
    merged = merge_small_sites(sizes, train_codes, min_site)
    site_map = fold_dir / "site_map.csv"
    site_map.write_text("code,institution\n" + "".join(f"{c},{i}\n" for c, i in sorted(merged.items())))
    cfg = dataclasses.replace(base_cfg, data=dataclasses.replace(base_cfg.data, site_map=str(site_map.resolve())))
    cohort = load_cohort(args.table, args.signatures, None, cfg.data)
    assert [p.case_id for p in cohort.patients] == [p.case_id for p in base_cohort.patients]
    test = np.concatenate([cohort.site_indices(s) for s in fold_sites])
    institutions = sorted({merged.get(s, s) for s in train_codes})
    pool = np.concatenate([cohort.site_indices(s) for s in institutions])
    train, val = stratified_train_val(cohort, pool, cfg.split.val_fraction, cfg.seed)
    split = Split(train, val, np.sort(test), tuple(sorted(fold_sites)))
    split.check_disjoint()
    largest = max(institutions, key=lambda s: (len(cohort.site_indices(s)), s))
    l_train, l_val = stratified_train_val(cohort, cohort.site_indices(largest), cfg.split.val_fraction, cfg.seed)
    local_split = Split(l_train, l_val, np.sort(test), split.test_sites)
    record = {
        "fold": k, "test_sites": sorted(fold_sites), "n_test": int(len(test)), "n_train_pool": int(len(pool)),
        "n_train": int(len(train)), "n_val": int(len(val)),
        "test_events": int(cohort.times_events(test)[1].sum()),
        "institutions": {s: int(len(cohort.site_indices(s))) for s in institutions},
        "merged": {m: sorted(c for c, g in merged.items() if g == m) for m in sorted(set(merged.values()))},
        "largest_site": largest, "n_largest": int(len(cohort.site_indices(largest))),
        "results": {}, "seconds": {},
    }
    return Fold(k, fold_dir, cfg, cohort, pool, split, local_split, institutions, record)


def _done(fold: Fold, method: str, test_metrics: dict, t0: float) -> None:
    """Record one method's held-out metrics and time; print its primary metrics."""
    record = fold.record
    record["results"][method] = metrics_of(test_metrics)
    record["seconds"][method] = round(time.perf_counter() - t0, 1)
    primary = {label(t, key) for t, key in PRIMARY}
    vals = "  ".join(f"{name} {m['value']:.3f}" if m else f"{name} -"
                     for name, m in record["results"][method].items() if name in primary)
    print(f"  fold {fold.k} {method:17s} {vals}  ({record['seconds'][method]:.0f} s)", flush=True)


def _federated(fold: Fold, strategy: str, args) -> None:
    """UMEML by ``strategy`` in the simulation engine, the fold's sites held out."""
    from umeml.data.source import CohortSource
    from umeml.simulation import simulate

    t0 = time.perf_counter()
    cfg = fold.cfg
    c = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, strategy=strategy,
                                                                train_sites=tuple(fold.institutions)))
    run_dir = fold.dir / f"fed-{strategy}"
    final = simulate(c, fold.cohort, CohortSource(table=str(args.table), signatures=str(args.signatures)),
                     run_dir, held_out=fold.split.test_sites)
    _done(fold, f"umeml {strategy}", final["pooled"], t0)
    fold.record.setdefault("federated", {})[strategy] = {
        "training_sites": final.get("training_sites"), "rounds": final.get("rounds"),
        "accepted_per_round": [e.get("accepted") for e in _history(run_dir)]}


def run_fold(k: int, fold_sites: list[str], base_cfg, base_cohort, args, out: Path) -> dict:
    """Every method on one fold; returns the fold's record (sites, sizes, metrics, times)."""
    from umeml.train.central import train_central

    fold = prepare_fold(k, fold_sites, base_cfg, base_cohort, args, out)
    cfg, record = fold.cfg, fold.record
    print(f"fold {k}: test sites {', '.join(sorted(fold_sites))} ({record['n_test']} patients); "
          f"{len(fold.institutions)} training institutions ({len(fold.pool)} patients; merged {record['merged']})",
          flush=True)
    methods = [m for m in METHODS if m not in args.skip]
    if "classical" in methods:
        t0 = time.perf_counter()
        _done(fold, "classical", classical(fold.cohort, fold.pool, fold.split.test, args.pcs, args.logreg_c,
                                           args.cox_penalizer, cfg.train.bootstrap, cfg.seed), t0)
    for strategy in ("fedavg", "fedprox"):
        if f"umeml {strategy}" in methods:
            _federated(fold, strategy, args)
    for name in ("snn", "umeml"):
        if f"{name} central" in methods:
            t0 = time.perf_counter()
            c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name))
            final = train_central(c, fold.cohort, fold.dir / f"central-{name}", fold.split, progress=False)
            _done(fold, f"{name} central", final["test"], t0)
    if "umeml local-only" in methods:
        t0 = time.perf_counter()
        final = train_central(cfg, fold.cohort, fold.dir / "local-only", fold.local_split, progress=False)
        _done(fold, "umeml local-only", final["test"], t0)
    (fold.dir / "fold.json").write_text(json.dumps(record, indent=2))
    return record


def _history(run_dir: Path) -> list[dict]:
    """The coordinator's per-round history (accepted updates), if resume.pt is readable."""
    try:
        import torch

        return list(torch.load(run_dir / "resume.pt", weights_only=False).get("history", []))
    except Exception:  # noqa: BLE001 - bookkeeping only
        return []


def _values(folds: list[dict], method: str, name: str) -> np.ndarray:
    return np.array([f["results"][method][name]["value"] for f in folds
                     if method in f["results"] and f["results"][method].get(name)])


def _ms(v: np.ndarray) -> str:
    if not len(v):
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def tables(folds: list[dict]) -> str:
    """Mean ± sd per method and metric, the per-fold table, and the goal checks."""
    names = [label(t, k) for t, k in METRICS]
    methods = [m for m in METHODS if any(m in f["results"] for f in folds)]
    lines = ["| method | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_ms(_values(folds, m, n)) for n in names) + " |")
    lines += ["", "| fold | held-out TSS sites | n test (deaths) | training institutions (patients) | "
              "local-only site (n) | " + " | ".join(f"{m}: grade / subtype / c-index" for m in
                                                    ("umeml central", "umeml fedavg", "classical")) + " |",
              "| --- | --- | --- | --- | --- |" + " --- |" * 3]
    for f in folds:
        merged = "; ".join(f"{g} = {'+'.join(c)}" for g, c in f["merged"].items())
        cells = []
        for m in ("umeml central", "umeml fedavg", "classical"):
            r = f["results"].get(m)
            cells.append(" / ".join(f"{r[label(t, k)]['value']:.2f}" if r and r.get(label(t, k)) else "-"
                                    for t, k in PRIMARY))
        lines.append(f"| {f['fold']} | {', '.join(f['test_sites'])} | {f['n_test']} ({f['test_events']}) | "
                     f"{len(f['institutions'])} ({f['n_train_pool']}){'; ' + merged if merged else ''} | "
                     f"{f['largest_site']} ({f['n_largest']}) | " + " | ".join(cells) + " |")
    def goal(method: str, reference: str, threshold: float) -> str:
        """Per-fold paired difference method - reference on each primary metric, against the goal."""
        parts = []
        for t, k in PRIMARY:
            d = _values(folds, method, label(t, k)) - _values(folds, reference, label(t, k))
            parts.append(f"{label(t, k)} {d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} "
                         f"({'met' if d.mean() >= threshold else 'not met'})")
        return f"- {method} minus {reference} (goal >= {threshold:+.2f}): " + "; ".join(parts)

    checks = [goal(fed, "umeml central", -0.02) for fed in ("umeml fedavg", "umeml fedprox")
              if fed in methods and "umeml central" in methods]
    if "classical" in methods:
        checks += [goal(m, "classical", 0.03) for m in ("umeml central", "umeml fedavg", "umeml fedprox") if m in methods]
    if checks:
        lines += ["", "Goals (per-fold paired difference, mean ± sd over folds; a goal is met when the mean "
                  "difference reaches it):"] + checks
    return "\n".join(lines)


def section_title(meta: dict) -> str:
    """The section heading (a --rounds diagnostic or another config gets its own section)."""
    title = SECTION
    if Path(meta.get("config", CONFIG.name)).name != CONFIG.name:
        title += f", config {Path(meta['config']).name}"
    rounds = meta.get("rounds_override")
    return f"{title}, federated with {rounds} rounds (diagnostic)" if rounds else title


def write_results(path: Path, meta: dict, wall: float, per_method: dict, folds: list[dict]) -> None:
    """Put this run's section (heading dated as ``meta`` says) into the markdown file ``path``."""
    write_section(path, section_title(meta), _intro(meta, wall, per_method) + tables(folds),
                  when=stamp(meta["date"], meta["machine"], meta["cores"]))


def _command_of(path: Path) -> str:
    """The command recorded in an earlier results.json (its file name when none)."""
    return json.loads(path.read_text()).get("meta", {}).get("command", path.name)


def reuse(records: list[dict], path: Path) -> list[str]:
    """Copy the methods a run skipped from an earlier run's results.json (same folds, same test
    sites); returns the copied method names."""
    earlier = {f["fold"]: f for f in json.loads(path.read_text())["folds"]}
    copied: set[str] = set()
    for f in records:
        old = earlier.get(f["fold"])
        if old is None or old["test_sites"] != f["test_sites"]:
            raise ValueError(f"{path}: fold {f['fold']} is missing or has other test sites")
        for method, res in old["results"].items():
            if method not in f["results"]:
                f["results"][method] = res
                copied.add(method)
    return [m for m in METHODS if m in copied]


def _intro(meta: dict, wall: float, per_method: dict) -> str:
    timing = ", ".join(f"{m} {sec / 60:.1f}" for m, sec in per_method.items() if sec)
    return (
        f"Command: `{meta['command']}` (config `{meta['config']}`). Wall time {wall / 60:.1f} min for the "
        f"whole script (minutes per method, all folds: {timing}), torch threads {meta['threads']}"
        + (f", 1-min load average {meta['load_average'][0]} to {meta['load_average'][1]} at fold boundaries"
           if meta.get("load_average") else "") + ". Genomics only "
        f"(the shared table has no slides): {meta['patients']} patients, {meta['sites']} TSS sites; folds from "
        f"`site_kfold` (seed {meta['seed']}). Every method is tested on all patients of the held-out fold's sites "
        "pooled, none of which it trained on; mean ± sd (ddof 1) over the folds.\n\n"
        f"- classical: multinomial L2 logistic regression (C {meta['logreg_c']}, balanced class weights; grade, "
        f"subtype) and Cox PH (lifelines, penalizer {meta['cox_penalizer']}; survival) on {meta['pcs']} "
        "standardised principal components of the standardised genomic features, all fitted on the fold's "
        "training patients (train + validation: nothing to select).\n"
        f"- snn / umeml central: `train_central` on the training folds (hidden_dim {meta['hidden_dim']}, "
        f"{meta['epochs']} epochs), checkpoint of the best validation epoch.\n"
        f"- umeml fedavg / fedprox (mu {meta['mu']}): `simulate`, {meta['rounds']} rounds x "
        f"{meta['local_epochs']} local epochs ({meta.get('optimizer', 'adamw')}), final global model, scored by the "
        "coordinator's pooled evaluation. "
        f"Training TSS sites with < {meta['min_site_patients']} patients (they would keep < k = {meta['k_min']} "
        "training patients after the validation split and not train) are merged in code order into "
        "pseudo-institutions merged-k of >= that many patients (a generated `data.site_map`).\n"
        "- umeml local-only: umeml trained centrally on the fold's largest training site alone.\n"
        "- bal_acc = balanced accuracy; n test (deaths) = held-out patients (observed deaths).\n"
        + (f"- rows {', '.join(meta['reused'])} (and the goal checks against them) are copied from "
           f"the run of `{meta['reused_from']}` on the same folds, not re-run.\n" if meta.get("reused") else "")
        + "\n")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=DATA / "tcga_gbmlgg_all_clean.csv.gz")
    ap.add_argument("--signatures", type=Path, default=DATA / "signatures.csv")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--folds", type=int, nargs="+", help="run only these folds (0-based), e.g. --folds 0")
    ap.add_argument("--skip", nargs="+", default=[], choices=METHODS, metavar="METHOD",
                    help=f"methods to skip, of: {', '.join(repr(m) for m in METHODS)}")
    ap.add_argument("--min-site-patients", type=int,
                    help="merge training sites below this size (default 2 * federation.k_min_patients)")
    ap.add_argument("--pcs", type=int, default=32, help="principal components for the classical models")
    ap.add_argument("--logreg-c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--cox-penalizer", type=float, default=0.01)
    ap.add_argument("--out", type=Path, help="run directories and results.json (default: a new temp dir)")
    ap.add_argument("--rounds", type=int,
                    help="override federation.rounds (a diagnostic; the reference run keeps the config's 10)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of this process (Ray's site workers use one each)")
    ap.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                    help="do not train: print (and --write) the tables of an earlier run's results.json")
    ap.add_argument("--reuse", type=Path, metavar="RESULTS_JSON",
                    help="fill the skipped methods' rows from an earlier run of the same folds")
    ap.add_argument("--write", type=Path, help="replace this run's section of this markdown file")
    return ap


def render(args) -> int:
    """Print (and --write) the tables of an earlier run's results.json without training."""
    saved = json.loads(args.render.read_text())
    if args.reuse:
        saved["meta"]["reused"] = reuse(saved["folds"], args.reuse)
        saved["meta"]["reused_from"] = _command_of(args.reuse)
    print(tables(saved["folds"]))
    if args.write:
        write_results(args.write, saved["meta"], saved["wall_seconds"], saved["seconds_per_method"], saved["folds"])
    return 0


def _relative(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def run_meta(args, cfg, cohort, chosen: list[int], loads: list[float], reused: list[str]) -> dict:
    """What results.json and the section's intro say about this run."""
    return {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(), "cores": os.cpu_count(),
        "command": "python -m bench.bench_gbmlgg"
        + (f" --config {_relative(args.config)}" if args.config.resolve() != CONFIG.resolve() else "")
        + (f" --folds {' '.join(map(str, chosen))}" if args.folds else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + (f" --skip {' '.join(repr(m) for m in args.skip)}" if args.skip else ""),
        "config": str(_relative(args.config)),
        "patients": len(cohort), "sites": len(cohort.sites), "seed": cfg.seed, "pcs": args.pcs,
        "logreg_c": args.logreg_c, "cox_penalizer": args.cox_penalizer, "threads": args.threads,
        "min_site_patients": args.min_site_patients or 2 * cfg.federation.k_min_patients,
        "k_min": cfg.federation.k_min_patients, "rounds": cfg.federation.rounds,
        "local_epochs": cfg.federation.local_epochs, "epochs": cfg.train.epochs, "mu": cfg.federation.proximal_mu,
        "optimizer": f"{cfg.train.optimizer}, lr {cfg.train.lr:g}",
        "hidden_dim": cfg.model.hidden_dim, "rounds_override": args.rounds,
        "load_average": [round(min(loads), 1), round(max(loads), 1)],
        "reused": reused, "reused_from": _command_of(args.reuse) if args.reuse else None,
    }


def _load(args):
    """The config (with --rounds applied) and the whole cohort."""
    from umeml.config import load_config
    from umeml.data.cohort import load_cohort

    cfg = load_config(args.config)
    if args.rounds:
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=args.rounds,
                                                                      evaluate_every=args.rounds))
    return cfg, load_cohort(args.table, args.signatures, None, cfg.data)


def main(argv=None) -> int:
    """Run the chosen folds (or --render an earlier run), print the tables, optionally write them."""
    args = _parser().parse_args(argv)
    if args.render:
        return render(args)
    missing = [str(p) for p in (args.table, args.signatures) if not p.is_file()]
    if missing:
        print(f"error: TCGA GBM-LGG data not found: {', '.join(missing)}\n(the shared table is expected at "
              f"{DATA}; pass --table and --signatures to point elsewhere)", file=sys.stderr)
        return 2
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    from umeml.data.splits import site_kfold

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_gbmlgg-"))
    out.mkdir(parents=True, exist_ok=True)
    args.table, args.signatures = args.table.resolve(), args.signatures.resolve()
    cfg, cohort = _load(args)
    folds = site_kfold(cohort, cfg.split.n_folds, cfg.seed)
    chosen = args.folds if args.folds is not None else list(range(cfg.split.n_folds))
    records, loads = [], [os.getloadavg()[0]]
    for k in chosen:
        fold_sites = sorted({cohort.patients[i].site for i in folds[k][1]})
        records.append(run_fold(k, fold_sites, cfg, cohort, args, out))
        loads.append(os.getloadavg()[0])
        (out / "results.json").write_text(json.dumps({"config": str(args.config), "folds": records}, indent=2))
    wall = time.perf_counter() - t_start
    per_method = {m: sum(f["seconds"].get(m, 0.0) for f in records) for m in METHODS}
    reused = reuse(records, args.reuse) if args.reuse else []
    timing = ", ".join(f"{m} {s:.0f} s" for m, s in per_method.items() if s)
    print("\n" + tables(records))
    print(f"\nwall time {wall:.0f} s ({wall / 60:.1f} min); per method over folds: {timing}")
    print(f"per-fold raw results: {out / 'results.json'}")
    meta = run_meta(args, cfg, cohort, chosen, loads, reused)
    (out / "results.json").write_text(json.dumps({"meta": meta, "folds": records, "wall_seconds": round(wall, 1),
                                                  "seconds_per_method": per_method}, indent=2))
    if args.write:
        write_results(args.write, meta, wall, per_method, records)
        print(f"wrote the section into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
