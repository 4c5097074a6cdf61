"""Issue 17: one total epsilon per site composing every release (DP-SGD rounds and the survival
histogram), in Renyi DP, never above basic composition and never below any single release."""

import pytest

from umeml.federation.accountants import total_epsilon
from umeml.federation.privacy import compute_epsilon, run_ledger, site_totals

DELTA = 1e-5


def test_total_composes_sgd_and_pure_releases():
    sgd = [(2.0, 0.5, 10), (2.0, 0.5, 10)]
    alone = compute_epsilon(sgd, DELTA)
    total = total_epsilon(sgd, [0.1, 0.1], DELTA)
    assert alone < total < alone + 0.2  # tighter than adding the histograms' 0.2
    assert total_epsilon(sgd, [], DELTA) == pytest.approx(alone)
    assert total_epsilon(sgd, [1.0], DELTA) <= alone + 1.0 + 1e-9  # never above basic composition
    assert total_epsilon(sgd, [1.0], DELTA) > alone
    assert total_epsilon([], [1.0], DELTA) == pytest.approx(1.0)
    assert total_epsilon([], [], DELTA) == 0.0
    # more steps or another release never lowers the total
    assert total_epsilon(sgd + [(2.0, 0.5, 1)], [0.1, 0.1], DELTA) > total
    assert total_epsilon(sgd, [0.1, 0.1, 0.1], DELTA) > total


def test_run_ledger_lists_every_release_per_site():
    entries = [{"site": s, "kind": "local", "round": r, "noise_multiplier": 1.5, "sample_rate": 0.5, "steps": 2,
                "epsilon": 1.0, "delta": DELTA, "target_epsilon": 8.0, "status": "trained"}
               for r in (1, 2) for s in ("A0", "A1")]
    entries[-1]["steps"] = 0  # A1 did not train in round 2
    release = {"kind": "survival_histogram", "epsilon": 0.5, "delta": 0.0, "sites": ["A0", "A1", "A2"]}
    ledger = run_ledger("x", {"enabled": True, "delta": DELTA}, None, [{"privacy": entries[:2]}, {"privacy": entries[2:]}],
                        [release])
    total = ledger["final"]["total"]
    assert sorted(total) == ["A0", "A1", "A2"]
    a0 = total["A0"]
    assert [r["kind"] for r in a0["releases"]] == ["dp_sgd", "survival_histogram"]
    assert a0["releases"][0]["steps"] == 4 and a0["releases"][0]["rounds"] == 2
    assert a0["epsilon"] == pytest.approx(total_epsilon([(1.5, 0.5, 2), (1.5, 0.5, 2)], [0.5], DELTA))
    assert total["A1"]["releases"][0]["steps"] == 2
    assert total["A2"]["epsilon"] == pytest.approx(total_epsilon([], [0.5], DELTA))
    assert site_totals([], [], DELTA) == {}


def test_simulate_prints_one_total_per_site_with_its_releases():
    from umeml.server.public_init import format_privacy_totals

    final = {"privacy": {"total": {"A0": {"epsilon": 8.41, "delta": DELTA, "releases": [
        {"kind": "dp_sgd", "epsilon_alone": 7.9, "steps": 20, "rounds": 10},
        {"kind": "survival_histogram", "epsilon_alone": 1.0}]}}}}
    text = format_privacy_totals(final)
    assert "A0: total epsilon 8.410 at delta 1e-05 (dp_sgd 7.9, survival_histogram 1)" in text
    assert format_privacy_totals({"privacy": None}) == ""


def test_named_part_without_checkpoint_or_public_sites_is_refused(tiny_cohort_dir):
    from umeml.data.cohort import load_data_dir
    from umeml.errors import ConfigError
    from umeml.server.public_init import needs_public_checkpoint, with_public_checkpoint

    from fed_helpers import tiny_experiment

    cfg = tiny_experiment(train={"trainable": "heads"})
    assert needs_public_checkpoint(cfg) and not needs_public_checkpoint(tiny_experiment())
    cohort = load_data_dir(str(tiny_cohort_dir), cfg.data)
    with pytest.raises(ConfigError, match="federation.init_checkpoint is not set.*sites: A0, A1, A2"):
        with_public_checkpoint(cfg, cohort, ("A2",), tiny_cohort_dir)  # every site is in the federation
