"""Issue 17 item 5: the class counts and genomic moments a site sends for federated
preprocessing are DP releases (clipped, noised, recorded in the site's ledger, capped by its
site.yaml), and the site's total epsilon composes every release."""

import dataclasses
import math

import numpy as np
import pytest

from umeml.config import ConfigError, config_from_dict, load_site_config
from umeml.data.cohort import load_data_dir
from umeml.data.dataset import GenomicScaler
from umeml.federation.accountants import total_epsilon
from umeml.federation.privacy import SiteLedger, calibrate_noise, compute_epsilon, release_terms, site_totals
from umeml.federation.protocol import check_handshakes, combine_preprocessing
from umeml.federation.site import SiteRuntime
from umeml.federation.stats_release import (
    CLASS_COUNTS,
    GENOMIC_MOMENTS,
    ReleaseEpsilons,
    StatsPrivacyRefusal,
    class_cells,
    genomic_release,
    genomic_sensitivity,
    marginals,
    merge_class_counts,
    merge_genomic_moments,
    release_epsilons,
)
from umeml.train.loop import task_heads

from fed_helpers import tiny_experiment

DELTA = 1e-5
DP = {"enabled": True, "target_epsilon": 4.0, "delta": DELTA}


def dp_experiment(**fed):
    return tiny_experiment(local_dp=DP, **fed)


def _sites(data_dir, cfg, state_root=None, **kw):
    cohort = load_data_dir(str(data_dir), cfg.data)
    return {s: SiteRuntime(s, cohort, cohort.site_indices(s), k_min=5, dp=cfg.federation.local_dp,
                           state_dir=str(state_root / s) if state_root else None, dp_seed=11 + i, **kw)
            for i, s in enumerate(("A0", "A1", "A2"))}


# ------------------------------------------------------------------------------ config
def test_stats_privacy_follows_local_dp_and_refuses_exact_statistics_under_dp():
    assert dp_experiment().federation.stats_private and not tiny_experiment().federation.stats_private
    assert tiny_experiment(stats_privacy={"enabled": True}).federation.stats_private
    with pytest.raises(ConfigError, match="x.yaml: federation.stats_privacy.enabled: false while "
                                          "federation.local_dp.enabled is true"):
        config_from_dict({"federation": {"local_dp": DP, "stats_privacy": {"enabled": False}}}, "x.yaml")
    # genomic_source auto: the public checkpoint's scale under statistics privacy, else the sites' moments
    assert dp_experiment(init_checkpoint="pub.pt").federation.genomics_from_checkpoint
    assert not dp_experiment().federation.genomics_from_checkpoint
    # (with preprocessing_source sites: its auto takes everything from a given checkpoint, test_checkpoint_prep.py)
    assert not tiny_experiment(init_checkpoint="pub.pt", preprocessing_source="sites").federation \
        .genomics_from_checkpoint  # no DP: as before
    assert not dp_experiment(init_checkpoint="pub.pt", preprocessing_source="sites",
                             stats_privacy={"genomic_source": "sites"}).federation.genomics_from_checkpoint
    with pytest.raises(ConfigError, match=r"x.yaml: federation.stats_privacy.genomic_clip: must be > 0"):
        config_from_dict({"federation": {"stats_privacy": {"genomic_clip": 0}}}, "x.yaml")


# ------------------------------------------------------------------------------ mechanisms
def test_class_cells_put_each_patient_in_one_cell_and_marginals_give_both_tasks(tiny_cohort_dir):
    cfg = dp_experiment()
    cohort = load_data_dir(str(tiny_cohort_dir), cfg.data)
    train = cohort.site_indices("A0")
    cells, cell_sub, cell_grade = class_cells(cohort, train)
    assert cells.sum() == len(train)  # L1 sensitivity 1: every patient in exactly one cell
    sub, grade = marginals(cells, cell_sub, cell_grade, len(cohort.subtypes), len(cohort.grades))
    assert sub == [sum(cohort.subtype_index(i) == k for i in train) for k in range(len(cohort.subtypes))]
    assert grade == [sum(cohort.grade_index(i) == g for i in train) for g in range(len(cohort.grades))]


def test_genomic_release_clips_and_adds_the_calibrated_noise():
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 5, (400, 30))  # many values beyond the clip
    sens = genomic_sensitivity(2.0, 30)
    assert sens == {"count": 1.0, "sum": 2.0 * math.sqrt(30), "sumsq": 4.0 * math.sqrt(30)}
    rec = genomic_release(rows, 2.0, 1.0, DELTA, seed=3)
    z = rec["noise_multiplier"]
    assert rec["epsilon"] <= 1.0 and compute_epsilon([(0.98 * z, 1.0, 1)], DELTA) > 1.0  # calibrated within 2 %
    # the joint release is one Gaussian of noise multiplier z: sum over blocks of (Delta/sigma)^2 = 1/z^2
    assert sum((sens[b] / rec["noise_std"][b]) ** 2 for b in sens) == pytest.approx(1 / z ** 2)
    clipped = np.clip(rows, -2, 2)
    err = np.asarray(rec["noisy"]["sum"]) - clipped.sum(axis=0)
    assert abs(err.std() / rec["noise_std"]["sum"] - 1) < 0.35  # 30 draws of the stated noise
    assert not np.allclose(rec["noisy"]["sum"], clipped.sum(axis=0))
    assert len(set(rec["noisy"]["count"])) == 1  # one noisy count, repeated per gene


# ------------------------------------------------------------------------------ composition
def _conversion(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """RDP -> (epsilon, delta) of Balle et al. 2020 (Opacus's), written out here to check it."""
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(eps))


def test_total_epsilon_composes_every_release_and_matches_a_direct_computation():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    sgd = [(1.1, 0.5, 20)]
    z_gen = 4.0
    releases = [{"kind": "survival_histogram", "epsilon": 1.0, "delta": 0.0},
                {"kind": CLASS_COUNTS, "epsilon": 1.5, "noise_multiplier": 2.8, "sample_rate": 1.0, "steps": 1},
                {"kind": GENOMIC_MOMENTS, "epsilon": 0.9, "noise_multiplier": z_gen, "sample_rate": 1.0, "steps": 1},
                {"kind": "survival_histogram", "epsilon": 0.5, "delta": 0.0}]
    gaussian, pure = release_terms(releases)
    assert gaussian == [(2.8, 1.0, 1), (z_gen, 1.0, 1)] and pure == [1.0, 0.5]
    total = total_epsilon(sgd + gaussian, pure, DELTA)
    # independent: Opacus's RDP of the SGD steps, the Gaussian's closed form, the pure bound
    orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = compute_rdp(q=0.5, noise_multiplier=1.1, steps=20, orders=orders) + orders / (2 * z_gen ** 2)
    rdp += orders / (2 * 2.8 ** 2)
    rdp += sum(np.minimum(e, orders * e ** 2 / 2) for e in pure)
    direct = _conversion(rdp, orders, DELTA)
    basic = compute_epsilon(sgd + gaussian, DELTA) + sum(pure)
    assert total == pytest.approx(min(direct, basic), rel=1e-6)
    assert total < basic  # RDP composition, tighter than the sum
    # every release counts: removing one lowers the total, adding one raises it
    for i in range(len(releases)):
        g, p = release_terms(releases[:i] + releases[i + 1:])
        assert total_epsilon(sgd + g, p, DELTA) < total
    g, p = release_terms(releases + [{"kind": CLASS_COUNTS, "noise_multiplier": 4.0, "sample_rate": 1.0, "steps": 1}])
    assert total_epsilon(sgd + g, p, DELTA) > total


def test_run_ledger_totals_list_the_statistics_releases():
    entries = [{"site": "A0", "kind": "local", "noise_multiplier": 1.1, "sample_rate": 0.5, "steps": 20}]
    releases = [{"kind": "survival_histogram", "epsilon": 1.0, "delta": 0.0, "sites": ["A0"]},
                {"kind": CLASS_COUNTS, "epsilon": 1.5, "delta": DELTA, "noise_multiplier": 2.8, "sample_rate": 1.0,
                 "steps": 1, "site": "A0", "mechanism": "Gaussian"},
                {"kind": GENOMIC_MOMENTS, "epsilon": 0.9, "delta": DELTA, "noise_multiplier": 4.0, "sample_rate": 1.0,
                 "steps": 1, "site": "A0", "mechanism": "Gaussian"}]
    a0 = site_totals(entries, releases, DELTA)["A0"]
    assert [r["kind"] for r in a0["releases"]] == ["dp_sgd", "survival_histogram", CLASS_COUNTS, GENOMIC_MOMENTS]
    assert a0["epsilon"] == pytest.approx(total_epsilon([(1.1, 0.5, 20), (2.8, 1.0, 1), (4.0, 1.0, 1)], [1.0], DELTA))
    without = site_totals(entries, releases[:2], DELTA)["A0"]["epsilon"]
    assert without < a0["epsilon"]


# ------------------------------------------------------------------------------ site side
def test_dp_site_sends_noisy_statistics_and_records_each_release(tiny_cohort_dir, tmp_path):
    cfg = dp_experiment()
    site = _sites(tiny_cohort_dir, cfg, tmp_path)["A0"]
    reply = site.preprocess(cfg)
    train, _ = site._split(cfg)
    c = site.cohort
    exact_sub = [sum(c.subtype_index(i) == k for i in train) for k in range(len(c.subtypes))]
    exact_sum = c.genomics[train][c.has_genomics[train]].astype(float).sum(axis=0)
    assert reply["subtype_counts"] != exact_sub and not np.allclose(reply["genomic_sum"], exact_sum)
    assert [r["kind"] for r in reply["releases"]] == [CLASS_COUNTS, GENOMIC_MOMENTS]
    assert reply["releases"][0]["epsilon"] <= 1.5 and reply["releases"][0]["noise_std"]["count"] > 2
    assert all("fingerprint" not in r and "noisy" not in r for r in reply["releases"])
    ledger = SiteLedger(tmp_path / "A0", "A0")
    kinds = [r["kind"] for r in ledger.releases()]
    assert kinds == ["survival_histogram", CLASS_COUNTS, GENOMIC_MOMENTS]
    gen = ledger.releases()[2]
    assert gen["clip"] == 3.0 and gen["sensitivity"]["sum"] == pytest.approx(3.0 * math.sqrt(gen["genes"]))
    assert gen["epsilon"] <= 0.5 and gen["experiment"] == cfg.name and gen["noise_std"]["sumsq"] > 0
    # a repeated request gets the same answer and costs nothing more
    assert site.preprocess(cfg) == reply and len(ledger.releases()) == 3
    # the handshake of a DP site carries no class counts and only modality presence flags
    hs = site.handshake(cfg)
    assert "subtype_counts" not in hs and hs["with_genomics"] in (0, 1) and hs["with_pathology"] in (0, 1)


def test_site_cap_refuses_a_federation_asking_for_more(tiny_cohort_dir, tmp_path):
    site_file = tmp_path / "site.yaml"
    site_file.write_text("site_id: A0\ndata_dir: data\nstats_privacy:\n  max_epsilon: 0.3\n")
    assert load_site_config(site_file).stats_privacy.max_epsilon == 0.3
    cfg = dp_experiment(survival_hist_epsilon=0.2)
    site = _sites(tiny_cohort_dir, cfg, tmp_path, stats_cap=0.3, site_file=str(site_file))["A0"]
    with pytest.raises(StatsPrivacyRefusal, match=rf"{site_file}: stats_privacy.max_epsilon: the federation asks "
                                                  r"for epsilon 0.8 for the class counts .*at most epsilon 0.3"):  # auto, total 4
        site.preprocess(cfg)
    assert not (tmp_path / "A0" / "privacy.json").exists()  # refused before anything was released
    ok = dp_experiment(survival_hist_epsilon=0.2, stats_privacy={"class_counts_epsilon": 0.3, "genomic_epsilon": 0.25})
    assert "releases" in site.preprocess(ok)
    exact = tiny_experiment(survival_hist_epsilon=0.2)  # no DP asked: the capped site still refuses exact values
    plain = _sites(tiny_cohort_dir, exact, None, stats_cap=0.3, site_file=str(site_file))["A0"]
    with pytest.raises(StatsPrivacyRefusal, match="exact values .*federation.stats_privacy is off"):
        plain.preprocess(exact)


def test_calibration_leaves_room_for_the_releases(tiny_cohort_dir, tmp_path):
    cfg = dp_experiment(rounds=3)
    site = _sites(tiny_cohort_dir, cfg, tmp_path)["A0"]
    site.preprocess(cfg)
    ledger = site.ledger()
    n_train = len(site._split(cfg)[0])
    entry, allowed, planned, _ = site._dp_round_entry(cfg, site.dp, ledger, n_train, 1)
    gaussian, pure = release_terms(ledger.releases())
    assert len(pure) == 1 and len(gaussian) == 2  # the histogram; class counts and genomic moments
    steps = cfg.federation.rounds * planned
    q, nm = entry["sample_rate"], entry["noise_multiplier"]
    full = total_epsilon([(nm, q, steps)] + gaussian, pure, DELTA)
    assert full <= 4.0 and full > 0.96 * 4.0  # the planned steps spend the budget the releases leave
    alone = calibrate_noise(4.0, DELTA, q, steps)
    assert alone < nm  # without the releases the noise would be smaller (and the total above the target)
    assert total_epsilon([(alone, q, steps)] + gaussian, pure, DELTA) > 4.0
    assert entry["epsilon"] < entry["epsilon_total"] <= 4.0
    assert entry["epsilon_total"] == pytest.approx(total_epsilon([(nm, q, allowed)] + gaussian, pure, DELTA))



def test_auto_release_epsilons_scale_with_each_sites_own_total(tiny_cohort_dir, tmp_path):
    # fixed defaults (1 + 1.5 + 0.5) took a whole total of 1: a federation at target 1 was refused
    fed = dp_experiment().federation
    assert release_epsilons(fed, None) == ReleaseEpsilons(1.0, 1.5, 0.5, 2.0)  # no DP: the reference values
    assert release_epsilons(fed, 16.0) == ReleaseEpsilons(1.0, 1.5, 0.5, 2.0)  # never more than at 8
    assert release_epsilons(fed, 4.0) == ReleaseEpsilons(0.8, 0.8, 0.5, 0.8)  # a fifth of the total, at most those
    set_by_hand = dp_experiment(survival_hist_epsilon=None, stats_privacy={"genomic_epsilon": 0.7}).federation
    assert release_epsilons(set_by_hand, 1.0) == ReleaseEpsilons(None, 0.2, 0.7, 0.2)
    with pytest.raises(ConfigError, match=r"class_counts_epsilon: expected float or 'auto' \(got 'half'\)"):
        config_from_dict({"federation": {"stats_privacy": {"class_counts_epsilon": "half"}}}, "x.yaml")
    cfg = tiny_experiment(local_dp={**DP, "target_epsilon": 1.0})
    site = _sites(tiny_cohort_dir, cfg, tmp_path)["A0"]
    reply = site.preprocess(cfg)  # no refusal at 1, and the releases are what "auto" resolves to there
    assert reply["survival_hist_epsilon"] == 0.2
    assert [r["kind"] for r in reply["releases"]] == [CLASS_COUNTS, GENOMIC_MOMENTS]
    assert all(r["epsilon"] <= 0.2 + 1e-9 for r in reply["releases"])
    entry = site._dp_round_entry(cfg, site.dp, site.ledger(), len(site._split(cfg)[0]), 1)[0]
    assert entry["noise_multiplier"] > 0  # DP-SGD still has room within the total of 1
    # a site whose own site.yaml total (0.5) is below the federation's scales by its own, and refuses
    # before any release when a fifth of it is too small for a Gaussian release to certify
    own = SiteRuntime("A1", site.cohort, site.cohort.site_indices("A1"), k_min=5,
                      dp=dataclasses.replace(cfg.federation.local_dp, target_epsilon=0.5),
                      state_dir=str(tmp_path / "A1"), dp_seed=3)
    with pytest.raises(StatsPrivacyRefusal, match=r"site A1: .*class_counts_epsilon 0.1: no Gaussian noise .*'auto' is a "
                                                  r"fifth of the site's local-DP total"):
        own.preprocess(cfg)
    assert not (tmp_path / "A1" / "privacy.json").exists()

# ------------------------------------------------------------------------------ coordinator merge
def test_noisy_moments_still_standardise_sanely_on_the_tiny_cohort(tiny_cohort_dir):
    cfg = dp_experiment()
    sites = _sites(tiny_cohort_dir, cfg)
    schema = check_handshakes({s: r.handshake(cfg) for s, r in sites.items()}, sites["A0"].handshake()["umeml_version"])
    notes = []
    prep = combine_preprocessing({s: r.preprocess(cfg) for s, r in sites.items()}, schema,
                                 task_heads(cfg, len(schema["subtypes"])), cfg.survival.n_bins, notes)
    mean, std = np.asarray(prep.genomic_mean), np.asarray(prep.genomic_std)
    assert np.isfinite(mean).all() and np.isfinite(std).all()
    assert np.abs(mean).max() <= 3.0 and 0.1 - 1e-6 <= std.min() and std.max() <= 3.0
    cohort = sites["A0"].cohort
    x = GenomicScaler(mean.astype(np.float32), std.astype(np.float32)).transform(cohort.genomics[cohort.has_genomics])
    assert np.isfinite(x).all() and np.abs(x).max() < 50
    for task in ("grade", "subtype"):
        w = np.asarray(prep.class_weights[task])
        assert np.isfinite(w).all() and (w > 0).all() and w.max() < 20
    assert any(n.startswith("genomic standardisation from DP moments") for n in notes)



def _replies(rows, eps):
    out = []
    for r in rows:
        rec = genomic_release(r, 3.0, eps, DELTA, seed=int(eps * 100) + len(out))
        out.append({"n": len(r), "genomic_count": rec["noisy"]["count"], "genomic_sum": rec["noisy"]["sum"],
                    "genomic_sumsq": rec["noisy"]["sumsq"], "releases": [{k: v for k, v in rec.items() if k != "noisy"}]})
    return out


def test_merge_clamps_noisy_counts_and_tends_to_the_exact_moments_as_noise_vanishes():
    rng = np.random.default_rng(1)
    rows = [rng.normal(0.5, 1.5, (300, 8)) for _ in range(3)]
    allrows = np.clip(np.concatenate(rows), -3, 3)
    truth_mean, truth_std = allrows.mean(axis=0), allrows.std(axis=0)
    notes = []
    precise = merge_genomic_moments(_replies(rows, 500.0), notes)
    assert np.abs(precise.mean - truth_mean).max() < 0.05 and np.abs(precise.std - truth_std).max() < 0.05
    # small sites, many genes: the noise swamps the moments; shrinking beats the raw ratio
    small = [rng.normal(0.3, 1.0, (16, 85)) for _ in range(3)]
    truth = np.clip(np.concatenate(small), -3, 3).mean(axis=0)
    replies = _replies(small, 0.5)
    shrunk = merge_genomic_moments(replies, notes)
    raw = np.sum([r["genomic_sum"] for r in replies], axis=0) / np.sum([r["genomic_count"] for r in replies], axis=0)
    assert np.mean((shrunk.mean - truth) ** 2) < np.mean((raw - truth) ** 2)
    assert np.abs(shrunk.mean).max() < 1.0 and np.abs(shrunk.std - 1).max() < 0.5
    assert "keep" in notes[-1]
    # a site's count is clamped to [0, its training patients]
    r = _replies(rows, 500.0)
    r[0]["genomic_count"] = [1e6] * 8
    assert np.abs(merge_genomic_moments(r).mean - truth_mean).max() < 0.2
    # noisy class totals are floored at their noise sd, so no weight is zero or huge
    rel = {"kind": CLASS_COUNTS, "noise_std": {"count": 2.8}}
    counts = [{"subtype_counts": [-3, 10, 0], "releases": [rel]}, {"subtype_counts": [1, 12, 0], "releases": [rel]}]
    merged = merge_class_counts(counts, "subtype", notes)
    assert merged.min() >= 1.0 and merged[1] == 22 and any("below the noise sd" in n for n in notes)
    assert list(merge_class_counts([{"subtype_counts": [0, 3]}], "subtype")) == [0, 3]  # exact: unchanged


def test_genomic_source_checkpoint_releases_no_moments_and_uses_the_public_scale(tiny_cohort_dir, tmp_path):
    import torch

    from umeml.federation.stats_release import checkpoint_standardisation
    from umeml.model import build_model, save_checkpoint

    cfg = dp_experiment(stats_privacy={"genomic_source": "checkpoint"})
    sites = _sites(tiny_cohort_dir, cfg)
    replies = {s: r.preprocess(cfg) for s, r in sites.items()}
    assert all("genomic_sum" not in r and [x["kind"] for x in r["releases"]] == [CLASS_COUNTS]
               for r in replies.values())
    schema = check_handshakes({s: r.handshake(cfg) for s, r in sites.items()}, sites["A0"].handshake()["umeml_version"])
    prep = combine_preprocessing(replies, schema, task_heads(cfg, len(schema["subtypes"])), cfg.survival.n_bins)
    assert prep.genomic_mean is None
    dim = sum(prep.group_sizes)
    torch.manual_seed(0)
    model = build_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
    path = save_checkpoint(tmp_path / "public.pt", model, {"genomic_mean": [0.25] * dim, "genomic_std": [2.0] * dim})
    notes = []
    public = checkpoint_standardisation(prep, str(path), notes)
    assert public.genomic_mean == [0.25] * dim and public.genomic_std == [2.0] * dim and "public checkpoint" in notes[0]
    bare = save_checkpoint(tmp_path / "bare.pt", model, {})
    with pytest.raises(ConfigError, match="bare.pt: federation.stats_privacy.genomic_source uses the checkpoint's"):
        checkpoint_standardisation(prep, str(bare), [])
    with pytest.raises(ConfigError, match="needs federation.init_checkpoint"):
        checkpoint_standardisation(prep, None, [])


def test_a_deployed_site_takes_its_cap_from_its_site_file(tiny_cohort_dir, tmp_path):
    from types import SimpleNamespace

    from umeml.client.app import deployed_site

    site_file = tmp_path / "site.yaml"
    site_file.write_text(f"site_id: A0\ndata_dir: {tiny_cohort_dir}\nk_min_patients: 5\nstate_dir: state\n"
                         "stats_privacy:\n  max_epsilon: 0.3\n")
    cfg = dp_experiment(survival_hist_epsilon=0.2)
    site = deployed_site(SimpleNamespace(node_config={"site-config": str(site_file)}), cfg)
    assert site.stats_cap == 0.3 and site.site_file == str(site_file)
    with pytest.raises(StatsPrivacyRefusal, match=rf"{site_file}: stats_privacy.max_epsilon"):
        site.preprocess(cfg)


def test_a_prv_site_composes_the_releases_too():
    from umeml.federation.privacy import composed_epsilon

    history = [(1.1, 0.5, 20), (2.8, 1.0, 1)]  # DP-SGD and a Gaussian release at sample rate 1
    sgd_and_gaussian = compute_epsilon(history, DELTA, "prv")
    assert sgd_and_gaussian > compute_epsilon(history[:1], DELTA, "prv")
    total = composed_epsilon(history, [1.0], DELTA, "prv")
    assert sgd_and_gaussian < total <= sgd_and_gaussian + 1.0 + 1e-9
    nm = calibrate_noise(8.0, DELTA, 0.5, 20, "prv", history=history[1:], pure=[1.0])
    assert composed_epsilon([(nm, 0.5, 20)] + history[1:], [1.0], DELTA, "prv") <= 8.0
