"""Metrics combined over sites say what they used: n actually used and why sites were dropped,
a site-level bootstrap next to the patient one, and warnings for a held-out set without a class."""

import numpy as np
import pytest

from umeml.federation.protocol import combine_site_metrics
from umeml.metrics import site_bootstrap_ci
from umeml.metrics.coverage import cohort_missing_classes, missing_class_messages
from umeml.rundir import RoundRecord
from umeml.server.cli import _warn_missing_classes, format_table

UNDEFINED = "macro AUC is undefined: fewer than two classes among the labels"


def _site(n: int, auc: float | None, rows: list[list[int]], c_index: float = 0.6, pairs: int = 50) -> dict:
    auc_entry = ({"value": auc, "ci_low": auc - 0.1, "ci_high": min(1.0, auc + 0.1), "n": n} if auc is not None
                 else {"value": None, "ci_low": None, "ci_high": None, "n": n, "error": UNDEFINED})
    return {"n": n, "tasks": {
        "grade": {"auc_macro": auc_entry, "confusion_matrix": {"value": rows, "n": n},
                  "accuracy": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8, "n": n}},
        "survival": {"c_index": {"value": c_index, "ci_low": c_index - 0.1, "ci_high": c_index + 0.1, "n": n,
                                 "pairs": pairs}}}}


# three lower-grade sites (grades II and III) and one site with grade IV only: its AUC is undefined
SITES = {
    "E1": _site(19, 0.80, [[8, 0, 0], [0, 11, 0], [0, 0, 0]]),
    "CS": _site(18, 0.70, [[6, 0, 0], [0, 12, 0], [0, 0, 0]]),
    "TQ": _site(16, 0.90, [[15, 0, 0], [0, 1, 0], [0, 0, 0]]),
    "27": _site(12, None, [[0, 0, 0], [0, 0, 0], [0, 0, 12]]),
}


def test_site_bootstrap_is_deterministic_with_seed_and_resamples_sites():
    values, weights = [0.8, 0.7, 0.9, 0.6], [19, 18, 16, 12]
    a = site_bootstrap_ci(values, weights, n_boot=500, seed=3)
    b = site_bootstrap_ci(values, weights, n_boot=500, seed=3)
    c = site_bootstrap_ci(values, weights, n_boot=500, seed=4)
    assert a == b and a != c
    assert a["site_n_boot"] == a["site_n_boot_used"] == 500
    mean = np.average(values, weights=weights)
    assert 0.6 <= a["site_ci_low"] < mean < a["site_ci_high"] <= 0.9
    # identical sites: nothing varies when sites are resampled
    same = site_bootstrap_ci([0.75] * 3, [10, 20, 30], n_boot=100, seed=0)
    assert same["site_ci_low"] == pytest.approx(0.75) and same["site_ci_high"] == pytest.approx(0.75)
    one = site_bootstrap_ci([0.8], [19], n_boot=100, seed=0)
    assert one["site_ci_low"] is None and "at least 2" in one["site_note"]


def test_combined_auc_records_n_used_and_the_dropped_site_with_why():
    comb = combine_site_metrics(SITES, seed=0, n_boot=200)
    auc = comb["grade"]["auc_macro"]
    assert auc["n"] == 19 + 18 + 16 and auc["n_reported"] == 19 + 18 + 16 + 12
    assert auc["sites"] == 3 and auc["dropped"] == {"27": UNDEFINED}
    assert auc["value"] == pytest.approx((19 * 0.8 + 18 * 0.7 + 16 * 0.9) / 53)
    assert auc["site_ci_low"] is not None and auc["site_ci_low"] <= auc["value"] <= auc["site_ci_high"]
    assert combine_site_metrics(SITES, seed=0, n_boot=200) == comb  # seeded
    # accuracy is defined everywhere: every site is used, nothing dropped
    assert comb["grade"]["accuracy"]["n"] == 65 and comb["grade"]["accuracy"]["dropped"] == {}
    # grade IV exists at site 27 only: with it, no class is missing; without it, IV is
    assert comb["grade"]["missing_classes"] == []
    lower = combine_site_metrics({k: v for k, v in SITES.items() if k != "27"}, seed=0, n_boot=0)
    assert lower["grade"]["missing_classes"] == [2]
    assert lower["grade"]["auc_macro"]["site_ci_low"] is None  # no resamples asked for
    (line,) = missing_class_messages(lower, {"grade": ["II", "III", "IV"], "subtype": ["A", "B"]}, "the held-out sites")
    assert "no grade IV patient" in line and "macro AUC averages the other classes" in line


def test_metrics_csv_and_table_carry_n_used_and_the_site_bootstrap():
    comb = combine_site_metrics(SITES, seed=0, n_boot=200)
    rows = RoundRecord(3, evaluation={"held_out": SITES, "held_out_combined": comb}).metric_rows()
    (auc,) = [r for r in rows if r.kind == "held_out_combined" and r.metric == "auc_macro"]
    assert auc.n == 53 and auc.note == f"n used 53 of 65 (dropped 27: {UNDEFINED})"
    (sites,) = [r for r in rows if r.kind == "held_out_combined_sites" and r.metric == "auc_macro"]
    assert (sites.value, sites.ci_low, sites.ci_high) == (auc.value, comb["grade"]["auc_macro"]["site_ci_low"],
                                                          comb["grade"]["auc_macro"]["site_ci_high"])
    final = {"schema_version": 2, "mode": "federated", "experiment": "x", "rounds": 3, "strategy": "fedavg", "held_out": SITES,
             "held_out_combined": comb}
    table = format_table(final)
    assert "0.796 [0.74, 0.85] n=53" in table  # the combined AUC cell shows its own n
    assert f"combined grade auc_macro: n used 53 of 65 (dropped 27: {UNDEFINED})" in table
    assert "resampling the held-out sites (site bootstrap): grade auc_macro [0.70, 0.90] (3 sites)" in table


class _Cohort:
    """The few cohort methods the class check reads."""
    grades = ("II", "III", "IV")
    subtypes = ("ASTR", "AASTR", "GBM")
    codes = {"A": ["ASTR", "AASTR"], "B": ["ASTR"], "C": ["GBM"]}

    def __init__(self):
        self.rows = [(site, code) for site, codes in self.codes.items() for code in codes]

    def site_indices(self, site):
        return np.array([i for i, (s, _) in enumerate(self.rows) if s == site])

    def grade_index(self, i):
        return {"ASTR": 0, "AASTR": 1, "GBM": 2}[self.rows[i][1]]

    def subtype_index(self, i):
        return self.subtypes.index(self.rows[i][1])


class _Cfg:
    tasks = ("grade", "subtype", "survival")


def test_held_out_set_without_a_class_is_warned_about(capsys):
    cohort = _Cohort()
    assert cohort_missing_classes(cohort, cohort.site_indices("A"), _Cfg.tasks) == {"grade": ["IV"], "subtype": ["GBM"]}
    assert cohort_missing_classes(cohort, [0, 1, 3], _Cfg.tasks) == {}
    _warn_missing_classes(_Cfg, cohort, ("A", "B"))
    err = capsys.readouterr().err
    assert "warning: the held-out sites A, B have no grade IV patient" in err
    assert "have no subtype GBM patient" in err
    _warn_missing_classes(_Cfg, cohort, ("A", "C"))
    assert capsys.readouterr().err == ""

