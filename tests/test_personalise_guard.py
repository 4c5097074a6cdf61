"""Guarded personalisation (issue 13, item 2): what a site personalises is decided on an inner
split of its training patients, never on the validation split that measures it; a head whose
fine-tuning raises its inner-validation loss stays global, a tiny inner split keeps every head
global, and the decision is reproducible."""

from __future__ import annotations

import pytest
import torch

from umeml.config import config_from_dict, config_to_dict
from umeml.errors import ConfigError
from umeml.federation import personalise as P
from umeml.train.experiment import loss_settings

from fed_helpers import site_runtimes, tiny_experiment

# a fine-tuning that helps one head and hurts the others: a large SGD step repairs a grade head
# whose bias says "class 0" for everyone, and overshoots on the subtype and survival heads
HURTING = {"optimizer": "sgd", "lr": 20.0, "momentum": 0.0}
GUARD = {"inner_fraction": 0.4, "min_inner_patients": 3, "min_inner_events": 1}  # sized for 15 training patients


def _setup(data_dir, train=None, **personalisation):
    cfg = tiny_experiment(k_min_patients=3, split={"val_fraction": 0.25}, train=train or HURTING,
                          personalise_epochs=3, personalisation={**GUARD, **personalisation})
    sites, prep, weights = site_runtimes(data_dir, cfg, dp_seed=0)  # seeded histogram noise: the same prep
    site = sites["A0"]
    site.k_min = 3
    bias = weights["heads.heads.grade.bias"]
    bias[:] = -60.0
    bias[0] = 60.0
    return cfg, site, prep, weights


def _inner_curves(cfg, site, prep, weights):
    """Each head's inner-validation loss after 0..epochs epochs of fine-tuning on the inner train."""
    train_idx, _ = site._split(cfg)
    groups = P.head_groups(site.build_model(cfg, prep), cfg.tasks)
    tuning = P.HeadTuning(site, cfg, prep, weights, torch.device("cpu"), loss_settings(cfg, prep), groups)
    return P.inner_curves(tuning, *P.inner_split(site, cfg, train_idx), cfg.federation.personalise_epochs)[0]


def _task_values(report, part, task):
    return {k: v for k, v in report[part]["tasks"][task].items() if k != "n"}


def test_choose_epochs_personalises_only_a_strictly_lower_loss():
    curves = {"grade": [1.0, 0.7, 0.8, 0.9], "subtype": [1.0, 1.2, 1.1, 1.3], "survival": [1.0, 1.0, 1.0, 1.0]}
    assert P.choose_epochs(curves) == {"grade": 1, "subtype": 0, "survival": 0}


def test_the_metric_criterion_also_needs_a_primary_metric_no_lower_than_global():
    curves = {"grade": [1.0, 0.7, 0.8], "survival": [1.0, 0.9, 0.8]}
    metrics = {"grade": [0.70, 0.69, 0.72], "survival": [0.60, None, 0.55]}
    assert P.choose_epochs(curves, metrics) == {"grade": 2, "survival": 0}
    assert P.choose_epochs(curves) == {"grade": 1, "survival": 2}


def test_a_head_whose_fine_tuning_hurts_its_inner_validation_stays_global(tiny_cohort_dir):
    cfg, site, prep, weights = _setup(tiny_cohort_dir)
    curves = _inner_curves(cfg, site, prep, weights)
    # the premise: fine-tuning lowers grade's inner-validation loss and raises subtype's at every epoch
    assert min(curves["grade"][1:]) < curves["grade"][0]
    assert min(curves["subtype"][1:]) > curves["subtype"][0]
    guarded = P.personalise(site, cfg, prep, weights, 3)
    assert guarded["heads"]["grade"] > 0 and guarded["heads"]["subtype"] == 0
    assert not guarded["guard"]["notes"] and guarded["heads"] == P.choose_epochs(curves)
    for task, epochs in guarded["heads"].items():  # a global head is exactly the global model's
        same = _task_values(guarded, "personalised", task) == _task_values(guarded, "global", task)
        assert same == (epochs == 0), task
    unguarded_cfg = config_from_dict(_with_guard(cfg, False))
    unguarded = P.personalise(site, unguarded_cfg, prep, weights, 3)
    assert unguarded["heads"] == {"grade": 3, "subtype": 3, "survival": 3} and "guard" not in unguarded
    # without the guard the hurting subtype head is fine-tuned too: its metrics move
    assert _task_values(unguarded, "personalised", "subtype") != _task_values(unguarded, "global", "subtype")
    assert unguarded["global"] == guarded["global"]  # the measurement's baseline is the same


def _with_guard(cfg, guard: bool) -> dict:
    raw = config_to_dict(cfg)
    raw["federation"]["personalisation"] = {**raw["federation"]["personalisation"], "guard": guard}
    return raw


def test_guarded_personalisation_is_deterministic(tiny_cohort_dir):
    cfg, site, prep, weights = _setup(tiny_cohort_dir)
    first, second = (P.personalise(site, cfg, prep, weights, 3) for _ in range(2))
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_a_tiny_inner_split_keeps_every_head_global(tiny_cohort_dir):
    cfg, site, prep, weights = _setup(tiny_cohort_dir, min_inner_patients=10)  # 15 training patients
    report = P.personalise(site, cfg, prep, weights, 3)
    assert report["heads"] == {"grade": 0, "subtype": 0, "survival": 0}
    assert report["guard"]["inner_val"] < 10 and "min_inner_patients=10" in report["guard"]["notes"][0]
    assert report["personalised"] == report["global"]


def test_too_few_inner_deaths_keep_the_survival_head_global(tiny_cohort_dir):
    cfg, site, prep, weights = _setup(tiny_cohort_dir, train={"optimizer": "sgd", "lr": 5.0, "momentum": 0.0},
                                      min_inner_events=1000)
    report = P.personalise(site, cfg, prep, weights, 3)
    assert report["heads"]["survival"] == 0 and report["heads"]["grade"] > 0
    assert any("min_inner_events=1000" in note for note in report["guard"]["notes"])
    assert _task_values(report, "personalised", "survival") == _task_values(report, "global", "survival")


@pytest.mark.parametrize("key, value, rule", [("inner_fraction", 0.95, "must be <= 0.9"),
                                              ("inner_fraction", 0.0, "must be > 0.0"),
                                              ("min_inner_events", 0, "must be >= 1"),
                                              ("criterion", "auc", "must be one of")])
def test_personalisation_keys_are_checked_by_file_and_key(key, value, rule):
    raw = config_to_dict(tiny_experiment())
    raw["federation"]["personalisation"] = {key: value}
    with pytest.raises(ConfigError, match=f"exp.yaml: federation.personalisation.{key}: {rule}"):
        config_from_dict(raw, "exp.yaml")


def test_the_summary_counts_the_sites_personalising_each_head_and_the_progress_says_it():
    from umeml.server.coordinator import _personalisation_lines

    tasks = {"grade": {"auc_macro": {"value": 0.7, "n": 12}}}
    site = {"n": 12, "n_train": 50, "epochs": 3, "guard": {"inner_train": 37, "inner_val": 13, "notes": []},
            "global": {"loss": 1.0, "tasks": tasks}, "personalised": {"loss": 0.9, "tasks": tasks}}
    summary = P.summarise_personalisation({"A": {**site, "site": "A", "heads": {"grade": 2, "survival": 0}},
                                           "B": {**site, "site": "B", "heads": {"grade": 0, "survival": 1}},
                                           "C": {"site": "C", "n": 3, "n_train": 9, "suppressed": True}}, 3)
    assert summary["guarded"] and summary["sites_personalising"] == {"grade": 1, "survival": 1}
    lines = _personalisation_lines(summary)
    assert lines[0].startswith("personalisation (heads, guarded, up to 3 epoch(s))")
    assert "A (n 12; epochs per head, 0 = global: grade 2, survival 0)" in lines[1]
