"""TCGA GBM-LGG (genomics only), site-disjoint 5-fold benchmark: classical peers, SNN, UMEML
centralized, UMEML federated (FedAvg, FedProx) and UMEML local-only on the same folds.

    python -m bench.bench_gbmlgg [--folds 0 1] [--out DIR] [--write docs/benchmarks.md]
    python -m bench.bench_gbmlgg --tune [--folds 0] --engine inprocess [--candidates NAME ...]

``--engine inprocess`` runs every federation in this process (``bench._inprocess``: the real
coordinator and site handlers, messages by direct calls) instead of Flower's Ray simulation
engine; on a busy 2-core machine it is several times faster and gives the same protocol.

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

from bench._harness import PRIMARY, REPO, mean_sd, metric_entry, spread, stamp, with_overrides, write_section
from bench._harness import TCGA as DATA

CONFIG = REPO / "configs" / "gbmlgg_folds.yaml"
BEST_CONFIG = REPO / "configs" / "gbmlgg_federated.yaml"  # issue 13's federated settings
OLD_CONFIG = REPO / "configs" / "gbmlgg_folds_sgd.yaml"  # the recommended setting before issue 13
EXTRA = (("grade", "balanced_accuracy"), ("subtype", "balanced_accuracy"))
METRICS = PRIMARY + EXTRA
# "umeml federated (old)" runs --old-config, "umeml federated" --best-config, both as they are
# (model, train and federation sections; the fold's site map and training institutions)
FEDERATED = {"umeml federated": "best_cfg", "umeml federated (old)": "old_cfg"}  # run in this order
METHODS = ("classical", "snn central", "umeml central", "umeml fedavg", "umeml fedprox", "umeml federated (old)",
           "umeml federated", "umeml local-only")
SECTION = "## TCGA GBM-LGG, site-disjoint 5-fold"
FEDOPT_SECTION = "## TCGA GBM-LGG, site-disjoint 5-fold, federated optimisation (issue 13)"
TUNING_SECTION = "## TCGA GBM-LGG, federated tuning pass on training sites only (issue 13)"
# the tuning pass's candidates: overrides of --best-config (all other keys as in that file; each
# names the server momentum it uses, so a candidate means the same whatever the file ships)
M5, M9 = {"server_momentum": 0.5}, {"server_momentum": 0.9}
CANDIDATES = {
    "fedavg, cosine": {"federation": {"strategy": "fedavg"}},
    "fedavgm 0.5, cosine": {"federation": M5},
    "fedavgm 0.5, cosine, optimizer kept at site": {"federation": {**M5, "optimizer_state": "site"}},
    "fedadam eta 0.01 tau 1e-3, cosine": {"federation": {"strategy": "fedadam", "server_lr": 0.01,
                                                         "server_tau": 0.001}},
    "fedavgm 0.9, cosine": {"federation": M9},
    "fedavgm 0.5, cosine, lr 0.05": {"train": {"lr": 0.05}, "federation": M5},
    "fedavgm 0.5, cosine, lr 0.01": {"train": {"lr": 0.01}, "federation": M5},
    "fedavgm 0.5, cosine, 1 local epoch": {"federation": {**M5, "local_epochs": 1}},
    "fedavgm 0.5, cosine, 4 local epochs": {"federation": {**M5, "local_epochs": 4}},
    "fedavgm 0.9, cosine, lr 0.05": {"train": {"lr": 0.05}, "federation": M9},
    "fedavgm 0.9, cosine, 4 local epochs": {"federation": {**M9, "local_epochs": 4}},
    "fedavg, adamw 5e-4 kept at site, cosine": {"train": {"optimizer": "adamw", "lr": 0.0005},
                                                "federation": {"strategy": "fedavg", "optimizer_state": "site"}},
    # label-skew drift control (issue 13's remaining grade gap): FedLC logit calibration at the sites,
    # FedProx's proximal term (no server momentum: one strategy per run), SCAFFOLD control variates
    "fedavgm 0.9, cosine, fedlc tau 0.5": {"federation": {**M9, "logit_calibration_tau": 0.5}},
    "fedavgm 0.9, cosine, fedlc tau 1": {"federation": {**M9, "logit_calibration_tau": 1.0}},
    "fedavgm 0.9, cosine, fedlc tau 2": {"federation": {**M9, "logit_calibration_tau": 2.0}},
    "fedprox mu 0.01, cosine": {"federation": {"strategy": "fedprox", "proximal_mu": 0.01}},
    "scaffold, server momentum 0.9, cosine": {"federation": {**M9, "strategy": "scaffold"}},
    "scaffold, no server momentum, cosine": {"federation": {"strategy": "scaffold", "server_momentum": 0.0}},
    "scaffold, server momentum 0.5, cosine": {"federation": {**M5, "strategy": "scaffold"}},
    # schedule length (issue 13: is the federation under-trained at 30 rounds?): the cosine schedule
    # stretches over the rounds, so a longer run also takes larger steps for longer
    "fedavgm 0.9, cosine, 30 rounds": {"federation": {**M9, "rounds": 30, "evaluate_every": 30}},  # the 30-round setting
    "fedavgm 0.9, cosine, 45 rounds": {"federation": {**M9, "rounds": 45}},
    # the shipped setting with the personalisation wave as before its guard (every head fine-tuned
    # for personalise_epochs): the same federation, so the same global model and held-out figures
    "fedavgm 0.9, cosine, 45 rounds, unguarded personalisation": {"federation": {**M9, "rounds": 45,
                                                                                 "personalisation": {"guard": False}}},
    "fedavgm 0.9, cosine, 60 rounds": {"federation": {**M9, "rounds": 60}},
    "fedavgm 0.9, cosine, 60 rounds, lr 0.05": {"train": {"lr": 0.05}, "federation": {**M9, "rounds": 60}},
    "fedavgm 0.95, cosine": {"federation": {"server_momentum": 0.95}},
    "scaffold, server momentum 0.9, cosine, 4 local epochs": {"federation": {**M9, "strategy": "scaffold",
                                                                             "local_epochs": 4}},
}


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


def federation(cfg, fold: Fold, args, run_dir: Path, on_round=None) -> dict:
    """One federation on ``fold`` (its sites held out, pooled held-out metrics): in Flower's
    simulation engine (``--engine ray``, what ``umeml-server simulate`` runs) or in this process
    (``--engine inprocess``: the same coordinator and site handlers, messages by direct calls,
    sites one after the other; ``on_round`` sees each round's global weights). Returns final.json."""
    from umeml.data.source import CohortSource

    source = CohortSource(table=str(args.table), signatures=str(args.signatures))
    if args.engine == "inprocess":
        from bench._inprocess import federate

        return federate(cfg, fold.cohort, source, run_dir, held_out=fold.split.test_sites, pooled=True,
                        on_round=on_round)
    from umeml.simulation import simulate

    return simulate(cfg, fold.cohort, source, run_dir, held_out=fold.split.test_sites)


def _federated(fold: Fold, strategy: str, args) -> None:
    """UMEML by ``strategy`` (``federation``), the fold's sites held out."""
    t0 = time.perf_counter()
    cfg = fold.cfg
    c = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, strategy=strategy,
                                                                train_sites=tuple(fold.institutions)))
    run_dir = fold.dir / f"fed-{strategy}"
    final = federation(c, fold, args, run_dir)
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
    for method, attr in FEDERATED.items():
        if method in methods:
            _federated_with(fold, method, getattr(args, attr), args)
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


def fold_config(fold: Fold, other):
    """``other``'s model, train and federation sections on ``fold``: the fold's data section
    (its site map) and its training institutions."""
    return dataclasses.replace(other, data=fold.cfg.data, federation=dataclasses.replace(
        other.federation, train_sites=tuple(fold.institutions)))


def _federated_with(fold: Fold, method: str, other, args) -> dict:
    """UMEML federated with the config ``other`` on ``fold`` (held-out metrics of the round its
    selection rule picked); records the selection, the last round's metrics and the
    personalisation wave's summary; returns final.json's content."""
    t0 = time.perf_counter()
    run_dir = fold.dir / ("fed-" + "".join(c if c.isalnum() else "-" for c in method))
    final = federation(fold_config(fold, other), fold, args, run_dir)
    _done(fold, method, final["pooled"], t0)
    history = _history(run_dir)
    last = history[-1]["evaluation"].get("pooled") if history else None
    fold.record.setdefault("federated", {})[method] = {
        "rounds": final.get("rounds"),
        "selection": {k: v for k, v in (final.get("selection") or {}).items() if k != "evaluation"},
        "last_round": metrics_of(last) if last else None,
        "personalisation": personal_summary(final.get("personalisation"))}
    return final


def personal_summary(p: dict | None) -> dict | None:
    """The personalisation wave in a fold's record: sites, validation patients, global and
    personalised combined primary metrics."""
    if not p or "global_combined" not in p:
        return None
    return {"n_sites": p["n_sites"], "n_validation": p["n_validation"], "epochs": p["epochs"],
            "guarded": p.get("guarded", False), "sites_personalising": p.get("sites_personalising", {}),
            **{part: {label(t, k): (metric_entry(p[f"{part}_combined"], t, k) or {}).get("value") for t, k in PRIMARY}
               for part in ("global", "personalised")}}


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


def tables(folds: list[dict]) -> str:
    """Mean ± sd per method and metric, the per-fold table, and the goal checks."""
    names = [label(t, k) for t, k in METRICS]
    methods = [m for m in METHODS if any(m in f["results"] for f in folds)]
    lines = ["| method | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(mean_sd(_values(folds, m, n)) for n in names) + " |")
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


def _mean_table(folds: list[dict], methods: list[str]) -> list[str]:
    names = [label(t, k) for t, k in METRICS]
    lines = ["| method | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    return lines + [f"| {m} | " + " | ".join(mean_sd(_values(folds, m, n)) for n in names) + " |" for m in methods]


def _paired(folds: list[dict], a: str, b: str, name: str) -> np.ndarray:
    """Per-fold ``a - b`` of one metric over the folds where both have it."""
    both = [f for f in folds if f["results"].get(a, {}).get(name) and f["results"].get(b, {}).get(name)]
    return np.array([f["results"][a][name]["value"] - f["results"][b][name]["value"] for f in both])


def _goal(folds: list[dict], method: str, reference: str, threshold: float) -> str:
    parts = []
    for t, k in PRIMARY:
        d = _paired(folds, method, reference, label(t, k))
        if len(d):
            parts.append(f"{label(t, k)} {d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} "
                         f"({'met' if d.mean() >= threshold else 'not met'})")
    return f"- {method} minus {reference} (goal >= {threshold:+.2f}): " + "; ".join(parts)


def _fold_rows(folds: list[dict], methods: list[str]) -> list[str]:
    """Per fold: held-out sites, each method's three primary metrics, the selected round."""
    lines = ["| fold | held-out TSS sites | n test (deaths) | " + " | ".join(f"{m}: grade / subtype / c-index"
                                                                       for m in methods)
             + " | selected round (last) | validation patients for selection (sites) |",
             "| --- | --- | --- |" + " --- |" * len(methods) + " --- | --- |"]
    for f in folds:
        cells = [" / ".join(f"{r[label(t, k)]['value']:.2f}" if (r := f["results"].get(m)) and r.get(label(t, k))
                            else "-" for t, k in PRIMARY) for m in methods]
        sel = f.get("federated", {}).get("umeml federated", {}).get("selection", {})
        lines.append(f"| {f['fold']} | {', '.join(f['test_sites'])} | {f['n_test']} ({f['test_events']}) | "
                     + " | ".join(cells) + f" | {sel.get('round', '-')} ({sel.get('last_round', '-')}) | "
                     f"{sel.get('n_validation', '-')} ({sel.get('sites', '-')}) |")
    return lines


def _personal_rows(folds: list[dict]) -> list[str]:
    """Global vs personalised (heads fine-tuned at the site) on the training sites' own validation."""
    names = [label(t, k) for t, k in PRIMARY]
    lines = ["| fold | sites reporting (validation patients) | " + " | ".join(f"{n}: global -> personalised"
                                                                          for n in names)
             + " | sites personalising grade / subtype / survival |",
             "| --- | --- |" + " --- |" * (len(names) + 1)]
    for f in folds:
        p = f.get("federated", {}).get("umeml federated", {}).get("personalisation")
        if not p:
            continue
        cells = [f"{p['global'][n]:.3f} -> {p['personalised'][n]:.3f}" if p["global"].get(n) is not None
                 and p["personalised"].get(n) is not None else "-" for n in names]
        heads = p.get("sites_personalising") or {}
        kept = " / ".join(str(heads.get(t, "-")) for t, _ in PRIMARY) if heads else "-"
        lines.append(f"| {f['fold']} | {p['n_sites']} ({p['n_validation']}) | " + " | ".join(cells) + f" | {kept} |")
    return lines


def personal_gains(folds: list[dict]) -> dict[str, dict[int, float]]:
    """Per primary metric, fold -> personalised minus global on the training sites' own validation."""
    out: dict[str, dict[int, float]] = {}
    for t, k in PRIMARY:
        n = label(t, k)
        out[n] = {f["fold"]: p["personalised"][n] - p["global"][n] for f in folds
                  if (p := f.get("federated", {}).get("umeml federated", {}).get("personalisation"))
                  and p["global"].get(n) is not None and p["personalised"].get(n) is not None}
    return out


def _personal_goal(folds: list[dict], what: str = "personalised minus global") -> str:
    parts = [f"{n} {spread(d.values())} ({'met' if np.mean(list(d.values())) >= 0 else 'not met'})"
             for n, d in personal_gains(folds).items() if d]
    return f"- {what} on the training sites' own validation (goal >= 0): " + "; ".join(parts)


def personal_baseline_lines(folds: list[dict], baseline: dict) -> list[str]:
    """This run's personalisation gains beside those of ``baseline`` (an earlier results.json on
    the same folds, e.g. the unguarded wave): per fold, the paired difference, and whether the
    held-out figures of ``umeml federated`` are identical (the wave runs after them)."""
    base_folds = [f for f in baseline["folds"] if f["fold"] in {g["fold"] for g in folds}]
    ours, theirs = personal_gains(folds), personal_gains(base_folds)
    held = {f["fold"]: f["results"].get("umeml federated") for f in base_folds}
    same = [f["fold"] for f in folds if held.get(f["fold"]) == f["results"].get("umeml federated")]
    names = list(ours)
    lines = [f"Against the personalisation wave of `{baseline.get('meta', {}).get('command', '?')}` on the same folds "
             f"(held-out metrics of umeml federated identical in folds {same or 'none'} of "
             f"{[f['fold'] for f in folds]}); personalised minus global, this run / baseline:", "",
             "| fold | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for f in folds:
        cells = [f"{ours[n][f['fold']]:+.3f} / {theirs[n][f['fold']]:+.3f}"
                 if f["fold"] in ours[n] and f["fold"] in theirs[n] else "-" for n in names]
        lines.append(f"| {f['fold']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(_personal_goal(base_folds, "baseline: personalised minus global"))
    paired = {n: [ours[n][k] - theirs[n][k] for k in ours[n] if k in theirs[n]] for n in names}
    lines.append("- this run minus baseline (paired over folds): "
                 + "; ".join(f"{n} {spread(d)}" for n, d in paired.items() if d))
    return lines


def fedopt_tables(folds: list[dict], seconds: dict, personal_baseline: dict | None = None) -> str:
    """The federated-optimisation section's tables: mean ± sd, per fold (with the selected
    round), personalisation (beside ``personal_baseline``'s, an earlier results.json, if given),
    and the issue's goals (wall time included)."""
    methods = [m for m in METHODS if any(m in f["results"] for f in folds)]
    per_fold = [m for m in ("umeml central", "umeml federated (old)", "umeml federated", "classical") if m in methods]
    last = "umeml federated, last round (diagnostic)"
    shown = [{**f, "results": {**f["results"], last: lr}} if (lr := f.get("federated", {}).get("umeml federated", {})
                                                                .get("last_round")) else f for f in folds]
    lines = _mean_table(shown, methods + ([last] if any(last in f["results"] for f in shown) else []))
    lines += [""] + _fold_rows(folds, per_fold)
    personal = _personal_rows(folds)
    if len(personal) > 2:
        lines += ["", "Personalisation wave of `umeml federated` (combined over the training sites whose validation "
                  "split has >= k patients; n-weighted, c-index by comparable pairs):", ""] + personal
    checks = [_goal(folds, "umeml federated", "umeml central", -0.02), _goal(folds, "umeml federated", "classical", 0.0),
              _goal(folds, "umeml federated (old)", "umeml central", -0.02)]
    checks = [c for c, need in zip(checks, (("umeml central",), ("classical",), ("umeml central", "umeml federated (old)")))
              if all(m in methods for m in need) and "umeml federated" in methods]
    if len(personal) > 2:
        checks.append(_personal_goal(folds))
    wall = seconds.get("umeml federated", 0.0)
    if wall and len(folds) == 5:
        checks.append(f"- wall time of the 5 federated runs (`umeml federated`, all folds; goal <= 20 min on 2 cores): "
                      f"{wall / 60:.1f} min ({'met' if wall <= 1200 else 'not met'})")
    lines += ["", "Goals (per-fold paired difference, mean ± sd over folds; a goal is met when the mean "
              "difference reaches it):"] + checks
    if personal_baseline is not None and len(personal) > 2:
        lines += [""] + personal_baseline_lines(folds, personal_baseline)
    return "\n".join(lines)


def section_title(meta: dict) -> str:
    """The section heading (a --rounds diagnostic or another config gets its own section)."""
    title = SECTION
    if Path(meta.get("config", CONFIG.name)).name != CONFIG.name:
        title += f", config {Path(meta['config']).name}"
    rounds = meta.get("rounds_override")
    return f"{title}, federated with {rounds} rounds (diagnostic)" if rounds else title


def write_results(path: Path, meta: dict, wall: float, per_method: dict, folds: list[dict],
                  personal_baseline: dict | None = None) -> None:
    """Put this run's section (heading dated as ``meta`` says) into the markdown file ``path``."""
    when = stamp(meta["date"], meta["machine"], meta["cores"])
    if any("umeml federated" in f["results"] for f in folds):
        write_section(path, meta.get("section") or FEDOPT_SECTION, fedopt_intro(meta, wall, per_method)
                      + fedopt_tables(folds, per_method, personal_baseline), when=when)
        return
    write_section(path, section_title(meta), _intro(meta, wall, per_method) + tables(folds), when=when)


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


def _describe(cfg) -> str:
    fed, train = cfg.federation, cfg.train
    strategy = fed.strategy + (f" (server momentum {fed.server_momentum:g})" if fed.strategy in ("fedavgm", "scaffold")
                               else "") + (f", FedLC tau {fed.logit_calibration_tau:g}" if fed.logit_calibration_tau
                                           else "")
    return (f"{strategy}, {fed.rounds} rounds x {fed.local_epochs} local epochs, local {train.optimizer} lr "
            f"{train.lr:g}, learning-rate schedule over rounds {fed.lr_schedule}"
            + (f" (warm-up {fed.warmup_rounds} rounds)" if fed.lr_schedule != "constant" else "")
            + f", optimizer state {fed.optimizer_state}, selection {fed.selection}, validation fraction "
            f"{cfg.split.val_fraction:g}" + (f", personalisation {_personalisation(fed)}" if fed.personalise_epochs
                                             else ""))


def _personalisation(fed) -> str:
    """How the personalisation wave ran, in words."""
    p = fed.personalisation
    if not p.guard:
        return f"{fed.personalise_epochs} epochs of every head (unguarded)"
    return (f"guarded (up to {fed.personalise_epochs} epochs per head, chosen on an inner split of "
            f"{p.inner_fraction:g} of each site's training patients; min {p.min_inner_patients} inner-validation "
            f"patients, min {p.min_inner_events} deaths for the survival head)")


def fedopt_intro(meta: dict, wall: float, per_method: dict) -> str:
    """What the federated-optimisation section says about the run (configs, timing, load)."""
    timing = ", ".join(f"{m} {sec / 60:.1f}" for m, sec in per_method.items() if sec)
    loads = meta.get("load_average") or ["?", "?"]
    return (
        f"Command: `{meta['command']}` (run with `nice -n 5`, torch threads {meta['threads']}, folds one after "
        f"the other). Wall time {wall / 60:.1f} min for the whole script (minutes per method, all folds: {timing}); "
        f"1-min load average {loads[0]} to {loads[1]} during the run on the 2-core machine shared with other "
        f"work, so times are upper bounds of a quiet machine's. Genomics only: {meta['patients']} patients, "
        f"{meta['sites']} TSS sites, folds from `site_kfold` (seed {meta['seed']}), training TSS sites below "
        f"{meta['min_site_patients']} patients merged into pseudo-institutions as in the sections above. Every "
        "method is tested on all patients of the held-out fold's sites pooled; mean ± sd (ddof 1) over folds. "
        + ("Federations ran in this process (`--engine inprocess`: the real coordinator and site handlers, messages "
           "by direct calls, sites one after the other), not in Flower's Ray simulation engine.\n\n"
           if meta.get("engine") == "inprocess" else "Federations ran in Flower's simulation engine (Ray).\n\n")
        + f"- classical, umeml central: as in the first section (`{meta['config']}`: central UMEML AdamW, best "
        "validation epoch).\n"
        + (f"- umeml federated (old): `{meta.get('old_config')}` as it is: {meta.get('old_settings')}; last round.\n"
           if per_method.get("umeml federated (old)") or "umeml federated (old)" in (meta.get("reused") or []) else
           f"- the old setting (`{meta.get('old_config')}`: {meta.get('old_settings')}; last round) was not re-run here "
           "(machine time); its figures on the same folds are in the section \"TCGA GBM-LGG, site-disjoint 5-fold, "
           "config gbmlgg_folds_sgd.yaml\" (row umeml fedavg).\n")
        + f"- umeml federated: `{meta.get('best_config')}`"
        + (f" with the tuning candidate {meta['best_candidate']!r}" if meta.get("best_candidate") else "")
        + f": {meta.get('best_settings')}. The settings come from the "
        "tuning pass (its own section), which read only the training sites' validation of fold 0.\n"
        + ("- selected round: the round whose global weights scored best (mean primary metric over tasks) on the "
           "training sites' validation splits combined over the sites with >= k = 10 validation patients (the others "
           "send only their count); (last) = the run's last round.\n" if "selection best_validation"
           in str(meta.get("best_settings")) else
           "- selected round: the last, a fixed number of rounds chosen in the tuning pass (selection last; no "
           "validation decides, so the last column has no entry).\n")
        + (f"- rows {', '.join(meta['reused'])} are copied from the run of `{meta['reused_from']}` on the same folds "
           "(same code, run alongside), not re-run.\n" if meta.get("reused") else "")
        + (f"- {meta['note']}\n" if meta.get("note") else "") + "\n")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=DATA / "tcga_gbmlgg_all_clean.csv.gz")
    ap.add_argument("--signatures", type=Path, default=DATA / "signatures.csv")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--best-config", type=Path, default=BEST_CONFIG,
                    help="config of the 'umeml federated' method (and the tuning pass's base)")
    ap.add_argument("--best-candidate", choices=list(CANDIDATES), metavar="NAME",
                    help="'umeml federated' = --best-config with this tuning candidate's overrides")
    ap.add_argument("--old-config", type=Path, default=OLD_CONFIG, help="config of 'umeml federated (old)'")
    ap.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), metavar="NAME",
                    help=f"with --tune: only these candidates, of: {', '.join(repr(c) for c in CANDIDATES)}")
    ap.add_argument("--tune", action="store_true",
                    help="the tuning pass instead: CANDIDATES on --folds (default 0), scored on the training "
                         "sites' validation only (no held-out metric is read)")
    ap.add_argument("--folds", type=int, nargs="+", help="run only these folds (0-based), e.g. --folds 0")
    ap.add_argument("--engine", choices=("ray", "inprocess"), default="ray",
                    help="federations in Flower's simulation engine (ray, as umeml-server simulate) or in this "
                         "process (inprocess: the same coordinator and site handlers, messages by direct calls)")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="with --tune: run every candidate at each of these experiment seeds (the folds stay the "
                         "config seed's), and report the seed spread")
    ap.add_argument("--append-tuning", action="store_true",
                    help="with --tune: add the rows to OUT/tuning.json instead of replacing it")
    ap.add_argument("--tuning-note", default="", help="with --tune --write: a sentence under the tuning table")
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
                    help="do not train: print (and --write) the tables of an earlier run's results.json "
                         "(with --tune: its tuning.json)")
    ap.add_argument("--personal-baseline", type=Path, metavar="RESULTS_JSON",
                    help="show this run's personalisation gains beside an earlier run's on the same folds "
                         "(e.g. the unguarded wave), paired per fold")
    ap.add_argument("--reuse", type=Path, metavar="RESULTS_JSON",
                    help="fill the skipped methods' rows from an earlier run of the same folds")
    ap.add_argument("--write", type=Path, help="replace this run's section of this markdown file")
    ap.add_argument("--note", default="", help="a sentence for the section's list (what the reader must know)")
    ap.add_argument("--section", help="with --write: the heading of the section to write (default: the tuning "
                                      "or federated-optimisation section), so a new study keeps the earlier figures")
    return ap


def candidate_config(base, overrides: dict):
    """``base`` with one candidate's overrides (section -> key -> value), checked like a file."""
    # personalisation off: the tuning pass scores the global model only; every round validated, so
    # that the federated score has a value per round (the training is the same under either rule:
    # sites reseed before training)
    return with_overrides(base, overrides, "bench_gbmlgg tuning candidate",
                          federation__personalise_epochs=0, federation__selection="best_validation")


def validation_scores(run_dir: Path) -> dict:
    """The training sites' combined validation score per round (what selection uses), from the
    run's history: no held-out metric is read."""
    scores = {e["round"]: e["evaluation"]["selection_score"]["score"] for e in _history(run_dir)
              if (e.get("evaluation") or {}).get("selection_score")}
    tail = [scores[r] for r in sorted(scores)[-5:]]
    return {"best": max(scores.values()) if scores else None, "best_round": max(scores, key=scores.get) if scores
            else None, "last5_mean": float(np.mean(tail)) if tail else None, "rounds_scored": len(scores)}


class PooledValidation:
    """The tuning pass's second score: every round's global weights on the training
    institutions' validation patients pooled (the patients each site validates on; every grade
    is among them), computed by the benchmark, which holds the data. A federation cannot compute
    this (sites below k release nothing); it is a developer's tuning signal on the training sites
    only. No held-out patient is scored."""

    def __init__(self, fold: Fold, cfg, run_dir: Path):
        from umeml.data.splits import stratified_train_val

        self.fold, self.cfg, self.run_dir = fold, cfg, run_dir
        self.idx = np.concatenate([stratified_train_val(fold.cohort, fold.cohort.site_indices(s),
                                                        cfg.split.val_fraction, cfg.seed)[1] for s in fold.institutions])
        self.scores: dict[int, float] = {}
        self._prep = None
        self._ds = None

    def __call__(self, rnd: int, weights: dict) -> None:
        """Score round ``rnd``'s global weights (``on_round`` of the in-process federation)."""
        import torch

        from umeml.data.dataset import make_loader
        from umeml.rundir import RunDir
        from umeml.train.evaluate import evaluate_predictions, selection_score
        from umeml.train.experiment import Preprocessing, build_model, loss_settings, make_dataset
        from umeml.train.loop import predict

        if self._prep is None:  # the run's preprocessing and validation set do not change between rounds
            self._prep = Preprocessing.from_json(RunDir(self.run_dir).preprocessing.read_text())
            self._ds = make_dataset(self.cfg, self.fold.cohort, self.idx, self._prep, train=False)
        model = build_model(self.cfg, self._prep)
        model.load_state_dict(weights)
        preds = predict(model, make_loader(self._ds, self.cfg.train.batch_size, False, 0),
                        loss_settings(self.cfg, self._prep), torch.device("cpu"))
        self.scores[rnd] = selection_score(evaluate_predictions(preds, self.cfg.tasks, n_boot=0, seed=self.cfg.seed),
                                           preds.loss)

    def summary(self) -> dict:
        """Last round's score, the best round's (and which), and the mean of the last 5 rounds."""
        if not self.scores:
            return {}
        rounds = sorted(self.scores)
        best = max(rounds, key=lambda r: (self.scores[r], -r))
        return {"pooled_last": self.scores[rounds[-1]], "pooled_best": self.scores[best], "pooled_best_round": best,
                "pooled_last5_mean": float(np.mean([self.scores[r] for r in rounds[-5:]])), "n_pooled_val": len(self.idx),
                "pooled_curve": {str(r): round(self.scores[r], 4) for r in rounds}}


def tune(args, cfg, cohort, folds, out: Path) -> int:
    """The tuning pass: every candidate on the chosen folds' training institutions (the fold's
    sites are held out and their metrics never read), scored on the training sites' validation
    (the federation's k-respecting score and, with ``--engine inprocess``, :class:`PooledValidation`)."""
    rows = []
    path = out / "tuning.json"
    for k in args.folds if args.folds is not None else [0]:
        fold = prepare_fold(k, sorted({cohort.patients[i].site for i in folds[k][1]}), cfg, cohort, args, out)
        runs = [(n, o, seed) for n, o in CANDIDATES.items() if not args.candidates or n in args.candidates
                for seed in (args.seeds or [None])]
        for name, overrides, seed in runs:
            t0 = time.perf_counter()
            run_dir = fold.dir / ("tune-" + "".join(c if c.isalnum() else "-" for c in name)
                                  + ("" if seed is None else f"-seed{seed}"))
            c = fold_config(fold, candidate_config(args.best_cfg, overrides))
            # the experiment seed (initial weights, shuffles, the sites' validation split); the folds
            # and merged institutions stay those of the config's seed
            c = c if seed is None else dataclasses.replace(c, seed=seed)
            pooled = PooledValidation(fold, c, run_dir) if args.engine == "inprocess" else None
            federation(c, fold, args, run_dir, on_round=pooled)
            row = {"fold": k, "candidate": name, **({} if seed is None else {"seed": seed}), **validation_scores(run_dir),
                   **(pooled.summary() if pooled else {}),
                   "seconds": round(time.perf_counter() - t0, 1), "load": os.getloadavg()[0]}
            rows.append(row)
            print(f"  tune fold {k} {name:45s} seed {c.seed} federated best {_f(row['best'])} (round {row['best_round']}), "
                  f"last 5 {_f(row['last5_mean'])}; pooled last {_f(row.get('pooled_last'))}, best "
                  f"{_f(row.get('pooled_best'))} (round {row.get('pooled_best_round')}), last 5 "
                  f"{_f(row.get('pooled_last5_mean'))}  ({row['seconds']:.0f} s, load {row['load']:.1f})", flush=True)
            earlier = json.loads(path.read_text()) if path.is_file() and args.append_tuning else []
            path.write_text(json.dumps(earlier + [row] if args.append_tuning else rows, indent=2))
    if args.write:
        write_tuning(args.write, json.loads(path.read_text()), args, args.tuning_note)
    return 0


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _seed_of(row: dict) -> str:
    return f" (seed {row['seed']})" if "seed" in row else ""


def seed_spread_lines(rows: list[dict]) -> list[str]:
    """With rows at several experiment seeds: per fold and candidate, the pooled last-round
    score's mean ± sd over seeds, and each candidate minus the first one, paired per seed."""
    seeded = [r for r in rows if "seed" in r and r.get("pooled_last") is not None]
    if len({r["seed"] for r in seeded}) < 2:
        return []
    lines = ["", "Seed spread (pooled validation, last round; mean ± sd over experiment seeds, ddof 1; "
                 "differences paired per seed):"]
    for k in sorted({r["fold"] for r in seeded}):
        by = {}
        for r in seeded:
            if r["fold"] == k:
                by.setdefault(r["candidate"], {})[r["seed"]] = r["pooled_last"]
        first = next(iter(by))
        for name, scores in by.items():
            line = (f"- fold {k}, {name}: {spread(scores.values())[1:]} over seeds {sorted(scores)} "
                    f"({', '.join(f'{scores[s]:.3f}' for s in sorted(scores))})")
            common = sorted(set(scores) & set(by[first]))
            if name != first and len(common) > 1:
                line += f"; minus {first}: {spread(scores[s] - by[first][s] for s in common)}"
            lines.append(line)
    return lines


def write_tuning(path: Path, rows: list[dict], args, note: str = "") -> None:
    """The tuning pass's section of the markdown file (``note``: what else the reader must know,
    such as candidates that did not run)."""
    folds = f" --folds {' '.join(map(str, args.folds))}" if args.folds else ""
    if getattr(args, "candidates", None):
        folds += " --candidates " + " ".join(repr(c) for c in args.candidates)
    if getattr(args, "seeds", None):
        folds += f" --seeds {' '.join(map(str, args.seeds))}"
    lines = [f"Command: `python -m bench.bench_gbmlgg --tune{folds} --engine {args.engine}` "
             f"(`nice -n 5`, torch threads {args.threads}; candidates run one after the other, each row's 1-min load "
             f"beside it). Candidates are overrides of `{_relative(args.best_config)}` (personalisation off; selection "
             "best_validation so that every round is validated, the training being the same under either rule). Two "
             "scores, both on the training institutions only (the fold's sites are held out as in the 5-fold run and "
             "no held-out metric is read), each the mean primary metric over the three tasks:", "",
             "- federated: the training sites' validation as the federation sees it, combined over the sites with "
             ">= k = 10 validation patients (the others send only their count): per round, the best round's and the "
             "mean of the last 5 rounds;",
             "- pooled: every round's global weights on the validation patients of all training institutions pooled "
             "(the patients each site validates on, every grade among them), computed by the benchmark, which holds "
             "the data; a federation cannot compute it (sites below k release nothing), so it serves only to tune "
             "the defaults: the last round's (what the fixed-rounds rule returns), the best round's, the mean of the "
             "last 5.", "",
             "| fold | candidate | federated: best round (round) | federated: mean of last 5 | pooled val patients | "
             "pooled: at the federated best round | pooled: last round | pooled: best round (round) | "
             "pooled: mean of last 5 | wall time (s) | 1-min load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['fold']} | {r['candidate']}{_seed_of(r)} | "
              f"{_f(r['best'])} ({r['best_round']}) | {_f(r['last5_mean'])} | "
              f"{r.get('n_pooled_val', '-')} | {_f((r.get('pooled_curve') or {}).get(str(r['best_round'])))} | "
              f"{_f(r.get('pooled_last'))} | {_f(r.get('pooled_best'))} "
              f"({r.get('pooled_best_round', '-')}) | {_f(r.get('pooled_last5_mean'))} | "
              f"{r['seconds']:.0f} | {r['load']:.1f} |" for r in rows]
    lines += seed_spread_lines(rows)
    lines += ["", note] if note else []
    write_section(path, getattr(args, "section", None) or TUNING_SECTION, "\n".join(lines) + "\n", when=stamp())


def render(args) -> int:
    """Print (and --write) the tables of an earlier run's results.json (with --tune: its
    tuning.json) without training."""
    saved = json.loads(args.render.read_text())
    if args.tune:
        print("\n".join(seed_spread_lines(saved)) or f"{len(saved)} tuning rows")
        if args.write:
            write_tuning(args.write, saved, args, args.tuning_note)
        return 0
    if args.reuse:
        saved["meta"]["reused"] = reuse(saved["folds"], args.reuse)
        saved["meta"]["reused_from"] = _command_of(args.reuse)
    if args.note:
        saved["meta"]["note"] = args.note
    if args.section:
        saved["meta"]["section"] = args.section
    folds = saved["folds"]
    baseline = json.loads(args.personal_baseline.read_text()) if args.personal_baseline else None
    print(fedopt_tables(folds, saved["seconds_per_method"], baseline)
          if any("umeml federated" in f["results"] for f in folds) else tables(folds))
    if args.write:
        write_results(args.write, saved["meta"], saved["wall_seconds"], saved["seconds_per_method"], saved["folds"],
                      baseline)
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
        + (f" --best-config {_relative(args.best_config)}" if args.best_config.resolve() != BEST_CONFIG.resolve() else "")
        + (f" --best-candidate {args.best_candidate!r}" if args.best_candidate else "")
        + (f" --skip {' '.join(repr(m) for m in args.skip)}" if args.skip else "")
        + (f" --engine {args.engine}" if args.engine != "ray" else ""),
        "engine": args.engine,
        "best_config": str(_relative(args.best_config)), "best_settings": _describe(args.best_cfg),
        "old_config": str(_relative(args.old_config)), "old_settings": _describe(args.old_cfg),
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
        "note": args.note, "section": args.section, "best_candidate": args.best_candidate,
    }


def _load(args):
    """The config (with --rounds applied) and the whole cohort."""
    from umeml.config import load_config
    from umeml.data.cohort import load_cohort

    cfg = load_config(args.config)
    args.best_cfg, args.old_cfg = load_config(args.best_config), load_config(args.old_config)
    if args.best_candidate:  # a tuning candidate's overrides on --best-config (the rest of the file as it is)
        args.best_cfg = with_overrides(args.best_cfg, CANDIDATES[args.best_candidate],
                                       f"{args.best_config} + candidate {args.best_candidate!r}")
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
    if args.tune:
        return tune(args, cfg, cohort, folds, out)
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
    baseline = json.loads(args.personal_baseline.read_text()) if args.personal_baseline else None
    print("\n" + (fedopt_tables(records, per_method, baseline) if any("umeml federated" in f["results"]
                                                                     for f in records) else tables(records)))
    print(f"\nwall time {wall:.0f} s ({wall / 60:.1f} min); per method over folds: {timing}")
    print(f"per-fold raw results: {out / 'results.json'}")
    meta = run_meta(args, cfg, cohort, chosen, loads, reused)
    (out / "results.json").write_text(json.dumps({"meta": meta, "folds": records, "wall_seconds": round(wall, 1),
                                                  "seconds_per_method": per_method}, indent=2))
    if args.write:
        write_results(args.write, meta, wall, per_method, records, baseline)
        print(f"wrote the section into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
