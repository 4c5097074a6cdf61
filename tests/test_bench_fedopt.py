"""The federated-optimisation benchmarks' bookkeeping: the template comparison's settings and
paired verdicts (bench/bench_template.py) and the GBM-LGG tuning pass's pooled-validation
summary (bench/bench_gbmlgg.py). No training here."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import bench_gbmlgg, bench_template
from bench._harness import REPO, with_overrides
from umeml.config import load_config


def _row(seed, setting, grade, validation):
    return {"seed": seed, "setting": setting, "held_out": {"grade": grade, "subtype": 0.8, "survival": 0.7},
            "validation": validation, "round": 8, "seconds": 1.0, "held_out_sites": ["A1"]}


def test_setting_overrides_apply_and_personalisation_is_off():
    base = load_config(REPO / "configs" / "demo.yaml")
    cfg = bench_template.setting_config(base, bench_template.SETTINGS[bench_template.OLD], 3)
    assert (cfg.seed, cfg.train.optimizer, cfg.train.lr) == (3, "adamw", 0.001)
    assert (cfg.federation.strategy, cfg.federation.selection, cfg.federation.personalise_epochs) == ("fedavg", "last", 0)
    assert cfg.model == base.model  # only train / federation keys change


def test_paired_differences_call_a_gap_inside_its_spread_a_tie():
    old, new = bench_template.OLD, bench_template.NEW
    rows = [_row(s, new, 0.90, 0.6) for s in range(3)]
    rows += [_row(0, old, 0.95, 0.7), _row(1, old, 0.96, 0.7), _row(2, old, 0.94, 0.7)]  # +0.05 +- 0.01: better
    text = bench_template.tables(rows, [old, new])
    assert f"- {old} minus reference: grade +0.050 ± 0.010 (better)" in text
    assert "subtype +0.000 ± 0.000 (tie)" in text
    noisy = [_row(s, new, 0.90, 0.6) for s in range(3)] + [_row(0, old, 0.99, 0.6), _row(1, old, 0.82, 0.6),
                                                          _row(2, old, 0.92, 0.6)]
    assert f"- {old} minus reference: grade +0.010 ± 0.085 (tie)" in bench_template.tables(noisy, [old, new])



def test_without_a_pair_the_tables_say_so_instead_of_an_empty_line():
    old, new = bench_template.OLD, bench_template.NEW
    alone = bench_template.tables([_row(s, new, 0.90, 0.6) for s in range(3)], [new])
    one_seed = bench_template.tables([_row(0, new, 0.90, 0.6), _row(0, old, 0.95, 0.7)], [old, new])
    for text in (alone, one_seed):
        assert "minus reference" not in text and "Paired per-seed" not in text  # was a header and "- x minus reference: "
        assert f"No paired differences from `{new}`" in text


def test_pooled_validation_summary_prefers_the_earlier_of_tied_rounds():
    pv = bench_gbmlgg.PooledValidation.__new__(bench_gbmlgg.PooledValidation)
    pv.idx, pv.scores = [0] * 40, {1: 0.5, 2: 0.7, 3: 0.7, 4: 0.6, 5: 0.6, 6: 0.65}
    out = pv.summary()
    assert (out["pooled_best_round"], out["pooled_best"], out["pooled_last"]) == (2, 0.7, 0.65)
    assert out["pooled_last5_mean"] == pytest.approx((0.7 + 0.7 + 0.6 + 0.6 + 0.65) / 5)
    assert out["n_pooled_val"] == 40


def test_drift_control_candidates_are_valid_configs_and_a_named_section_keeps_the_others(tmp_path):
    base = load_config(REPO / "configs" / "gbmlgg_federated.yaml")
    for name in ("fedavgm 0.9, cosine, fedlc tau 1", "scaffold, server momentum 0.9, cosine"):
        cfg = bench_gbmlgg.candidate_config(base, bench_gbmlgg.CANDIDATES[name])
        assert cfg.federation.personalise_epochs == 0
    assert bench_gbmlgg.candidate_config(base, bench_gbmlgg.CANDIDATES["scaffold, server momentum 0.9, cosine"]
                                         ).federation.strategy == "scaffold"
    doc = tmp_path / "b.md"
    doc.write_text(f"{bench_gbmlgg.TUNING_SECTION} (old)\n\nearlier figures\n")
    args = bench_gbmlgg._parser().parse_args(["--tune", "--section", "## Drift control tuning"])
    row = {"fold": 0, "candidate": "x", "best": 0.7, "best_round": 3, "last5_mean": 0.7, "seconds": 1.0, "load": 1.0}
    bench_gbmlgg.write_tuning(doc, [row], args)
    text = doc.read_text()
    assert "earlier figures" in text and "## Drift control tuning" in text and "| 0 | x |" in text


def test_schedule_length_candidates_set_rounds_lr_and_momentum():
    base = load_config(REPO / "configs" / "gbmlgg_federated.yaml")
    cfg = bench_gbmlgg.candidate_config(base, bench_gbmlgg.CANDIDATES["fedavgm 0.9, cosine, 60 rounds, lr 0.05"])
    assert (cfg.federation.rounds, cfg.train.lr, cfg.federation.server_momentum) == (60, 0.05, 0.9)
    assert bench_gbmlgg.candidate_config(base, bench_gbmlgg.CANDIDATES["fedavgm 0.9, cosine, 45 rounds"]
                                         ).federation.rounds == 45
    assert bench_gbmlgg.candidate_config(base, bench_gbmlgg.CANDIDATES["fedavgm 0.9, cosine, 30 rounds"]
                                         ).federation.rounds == 30
    assert bench_gbmlgg.candidate_config(base, bench_gbmlgg.CANDIDATES["fedavgm 0.95, cosine"]
                                         ).federation.server_momentum == 0.95


def test_the_unguarded_personalisation_candidate_changes_only_the_guard():
    base = load_config(REPO / "configs" / "gbmlgg_federated.yaml")
    assert base.federation.personalisation.guard and base.federation.personalise_epochs == 3
    name = "fedavgm 0.9, cosine, 45 rounds, unguarded personalisation"
    cfg = with_overrides(base, bench_gbmlgg.CANDIDATES[name], name)
    assert not cfg.federation.personalisation.guard
    shipped = with_overrides(base, bench_gbmlgg.CANDIDATES["fedavgm 0.9, cosine, 45 rounds"], "shipped")
    assert dataclasses.replace(cfg.federation, personalisation=shipped.federation.personalisation) == shipped.federation


def _fold_with_personalisation(fold, gains, held_out=0.8):
    names = [bench_gbmlgg.label(t, k) for t, k in bench_gbmlgg.PRIMARY]
    return {"fold": fold, "results": {"umeml federated": {"grade auc_macro": {"value": held_out}}},
            "federated": {"umeml federated": {"personalisation": {
                "global": {n: 0.7 for n in names}, "personalised": {n: 0.7 + g for n, g in zip(names, gains)}}}}}


def test_personalisation_beside_a_baseline_is_paired_per_fold_and_checks_the_held_out_figures():
    ours = [_fold_with_personalisation(0, (0.01, 0.0, 0.0)), _fold_with_personalisation(1, (0.03, 0.0, -0.01))]
    base = {"meta": {"command": "unguarded"},
            "folds": [_fold_with_personalisation(0, (0.02, 0.01, -0.02)),
                      _fold_with_personalisation(1, (0.02, 0.01, -0.04), held_out=0.75)]}
    text = "\n".join(bench_gbmlgg.personal_baseline_lines(ours, base))
    assert "identical in folds [0] of [0, 1]" in text
    assert "| 0 | +0.010 / +0.020 | +0.000 / +0.010 | +0.000 / -0.020 |" in text
    assert "survival c_index +0.025 ± 0.007" in text  # paired: +0.02 and +0.03
    assert "baseline: personalised minus global" in text and "grade auc_macro +0.020 ± 0.000 (met)" in text


def test_the_tuning_seed_spread_pairs_candidates_per_seed():
    rows = [{"fold": 0, "candidate": c, "seed": s, "pooled_last": v}
            for c, vals in (("30 rounds", (0.78, 0.80, 0.76)), ("45 rounds", (0.80, 0.81, 0.79))) for s, v in enumerate(vals)]
    lines = bench_gbmlgg.seed_spread_lines(rows)
    assert "- fold 0, 30 rounds: 0.780 ± 0.020 over seeds [0, 1, 2] (0.780, 0.800, 0.760)" in lines
    assert lines[-1].endswith("minus 30 rounds: +0.020 ± 0.010")
    assert bench_gbmlgg.seed_spread_lines(rows[:1] + rows[3:4]) == []  # one seed: no spread
    args = bench_gbmlgg._parser().parse_args(["--tune", "--seeds", "0", "1", "2"])
    assert args.seeds == [0, 1, 2]


def test_a_tuning_json_renders_into_its_section_with_the_seed_spread(tmp_path):
    rows = [{"fold": 0, "candidate": c, "seed": s, "best": 0.7, "best_round": 30, "last5_mean": 0.7,
             "pooled_last": v, "seconds": 1.0, "load": 1.0}
            for c, vals in (("a", (0.78, 0.80)), ("b", (0.80, 0.81))) for s, v in enumerate(vals)]
    (tmp_path / "tuning.json").write_text(json.dumps(rows))
    doc = tmp_path / "b.md"
    args = bench_gbmlgg._parser().parse_args(["--tune", "--seeds", "0", "1", "--candidates", "fedavg, cosine",
                                              "--render", str(tmp_path / "tuning.json"), "--write", str(doc),
                                              "--section", "## Seeds"])
    assert bench_gbmlgg.render(args) == 0
    text = doc.read_text()
    assert "--seeds 0 1" in text and "| 0 | b (seed 1) |" in text and "minus a: +0.015 ± 0.007" in text
