"""Site-wise patch-feature standardisation (``data.site_standardise: features``): exact where no
privacy applies, a DP release composed into the site's total under statistics privacy, never
the exact statistics at a DP site, and a starting checkpoint trained with the same inputs."""

import dataclasses

import numpy as np
import pytest

from umeml.config import ConfigError
from umeml.data.cohort import load_data_dir
from umeml.data.site_norm import check_checkpoint, exact_standardisers, patient_moments
from umeml.data.synth import SynthSpec, generate
from umeml.federation.accountants import total_epsilon
from umeml.federation.privacy import release_terms
from umeml.federation.site import SiteRuntime
from umeml.federation.stats_release import FEATURE_MOMENTS, feature_moments_release, feature_sensitivity
from umeml.train.experiment import build_model, make_dataset, prepare

from fed_helpers import tiny_experiment

DELTA = 1e-5
DP = {"enabled": True, "target_epsilon": 4.0, "delta": DELTA}
STD = {"site_standardise": "features", "feature_clip": 3.0}


@pytest.fixture(scope="module")
def stained_pair(tmp_path_factory):
    """The same synthetic world twice: the demo's stain and one three times as strong."""
    root = tmp_path_factory.mktemp("stain")
    spec = SynthSpec(sites=3, patients=16, seed=5, feature_dim=16, median_patches=60, min_patches=40, max_patches=80)
    generate(spec, root / "weak")
    generate(dataclasses.replace(spec, stain_shift=1.2), root / "strong")
    return root / "weak", root / "strong"


def _site_means(data_dir, cfg, standardised: bool):
    """Per site: the mean over patients of the (standardised) mean patch feature, as the model sees it."""
    cohort = load_data_dir(str(data_dir), cfg.data)
    idx = np.arange(len(cohort.patients))
    prep = prepare(cfg, cohort, idx)
    run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, site_standardise="features"
                                                             if standardised else "none"))
    ds = make_dataset(run, cohort, idx, prep, train=False)
    out = {}
    for site in cohort.sites:
        items = [ds[int(i)] for i in cohort.site_indices(site)]  # idx is every patient: position = index
        out[site] = np.mean([np.asarray(it.features, np.float64).mean(axis=0) for it in items
                             if it.features is not None], axis=0)
    return out


def test_standardisation_removes_a_sites_stain(stained_pair):
    weak, strong = stained_pair
    cfg = tiny_experiment(data={"max_patches": None})
    raw_w, raw_s = _site_means(weak, cfg, False), _site_means(strong, cfg, False)
    std_w, std_s = _site_means(weak, cfg, True), _site_means(strong, cfg, True)
    for site in raw_w:
        assert np.abs(std_w[site]).max() < 1e-4 and np.abs(std_s[site]).max() < 1e-4  # every site centred
        assert np.linalg.norm(raw_s[site] - raw_w[site]) > 0.5  # the stain moved the raw features ...
    # ... and standardised patients of the two stains look alike: same biology, same inputs up to noise
    cohort_w, cohort_s = load_data_dir(str(weak), cfg.data), load_data_dir(str(strong), cfg.data)
    i = cohort_w.site_indices("A1")
    sw, ss = exact_standardisers(cohort_w, i)["A1"], exact_standardisers(cohort_s, i)["A1"]
    mw, _ = patient_moments(cohort_w, i)
    ms, _ = patient_moments(cohort_s, i)
    gap_raw = np.linalg.norm(mw - ms, axis=1).mean()
    gap_std = np.linalg.norm((mw - sw.mean) / sw.scale - (ms - ss.mean) / ss.scale, axis=1).mean()
    assert gap_std < 0.1 * gap_raw


def test_release_noise_and_clipping_follow_the_calibration():
    rng = np.random.default_rng(0)
    means, squares = rng.normal(0, 1.0, (50, 8)), rng.uniform(0, 1, 50)
    means[0] *= 100  # one patient far out: clipped to the bound, not dominating the sum
    sens = feature_sensitivity(2.0, 8)
    draws = [feature_moments_release(means, squares, 2.0, 1.5, DELTA, seed=s) for s in range(300)]
    rec = draws[0]
    assert rec["kind"] == FEATURE_MOMENTS and rec["epsilon"] <= 1.5 and rec["clipped_patients"] >= 1
    z = rec["noise_multiplier"]
    # the blocks compose to one Gaussian of multiplier z: sum over blocks of (sensitivity / sd)^2 = 1 / z^2
    assert sum((sens[b] / rec["noise_std"][b]) ** 2 for b in sens) == pytest.approx(1 / z ** 2)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    clipped_sum = (means * np.minimum(1, 2.0 / norms)).sum(axis=0)
    noise = np.array([d["noisy"]["sum"] for d in draws]) - clipped_sum
    assert noise.std() == pytest.approx(rec["noise_std"]["sum"], rel=0.05)
    assert abs(noise.mean()) < 4 * rec["noise_std"]["sum"] / np.sqrt(noise.size)


def _dp_site(data_dir, cfg, state_dir=None):
    cohort = load_data_dir(str(data_dir), cfg.data)
    return SiteRuntime("A0", cohort, cohort.site_indices("A0"), k_min=5, dp=cfg.federation.local_dp,
                       state_dir=None if state_dir is None else str(state_dir), dp_seed=3)


@pytest.mark.timeout(120)  # the release once deadlocked on the ledger's lock inside a DP round
def test_a_dp_site_standardises_with_its_release_and_composes_it(tiny_cohort_dir, tmp_path):
    cfg = tiny_experiment(local_dp=DP, rounds=3, data=STD)
    site = _dp_site(tiny_cohort_dir, cfg, tmp_path / "A0")
    reply = site.preprocess(cfg)
    kinds = [r["kind"] for r in reply["releases"]]
    assert FEATURE_MOMENTS in kinds  # the run's report lists it with the other releases
    assert "noisy" not in reply["releases"][kinds.index(FEATURE_MOMENTS)]  # the values never leave
    assert site.standardisers(cfg)["A0"].source == "dp"
    ledger = site.ledger()
    assert [r["kind"] for r in ledger.releases()].count(FEATURE_MOMENTS) == 1
    prep = prepare(cfg, site.cohort, site._split(cfg)[0])
    assert site.dataset(cfg, site._split(cfg)[0], prep, True).standardisers["A0"].source == "dp"
    # DP-SGD is calibrated for what the releases (now four Gaussian ones) leave of the total
    entry, allowed, _, _ = site._dp_round_entry(cfg, site.dp, ledger, len(site._split(cfg)[0]), 1)
    gaussian, pure = release_terms(ledger.releases())
    assert len(gaussian) == 3  # class counts, genomic moments, feature moments
    assert entry["epsilon_total"] == pytest.approx(
        total_epsilon([(entry["noise_multiplier"], entry["sample_rate"], allowed)] + gaussian, pure, DELTA))
    # a new site process (a round's ClientApp) trains under DP: the same answer, no second release
    again = _dp_site(tiny_cohort_dir, cfg, tmp_path / "A0")
    weights, metrics = again.train(cfg, prep, build_model(cfg, prep).state_dict(), 1)
    assert weights is not None and metrics["privacy"]["epsilon_total"] <= 4.0
    np.testing.assert_array_equal(again.standardisers(cfg)["A0"].mean, site.standardisers(cfg)["A0"].mean)
    assert [r["kind"] for r in again.ledger().releases()].count(FEATURE_MOMENTS) == 1


def test_without_statistics_privacy_a_site_uses_exact_statistics(tiny_cohort_dir):
    cfg = tiny_experiment(data=STD)
    site = _dp_site(tiny_cohort_dir, cfg)
    std = site.standardisers(cfg)["A0"]
    assert std.source == "exact"
    exact = exact_standardisers(site.cohort, site.indices)["A0"]
    np.testing.assert_allclose(std.mean, exact.mean)
    assert "releases" not in site.preprocess(cfg)


def test_a_held_out_site_under_dp_standardises_exactly_and_releases_nothing(tiny_cohort_dir, tmp_path):
    cfg = tiny_experiment(local_dp=DP, data=STD, split={"test_sites": ["A0"]})
    site = _dp_site(tiny_cohort_dir, cfg, tmp_path / "A0")
    assert site.standardisers(cfg)["A0"].source == "exact"  # it never trains; its metrics are outside DP
    assert not (tmp_path / "A0" / "privacy.json").exists()
    training = tiny_experiment(local_dp=DP, data=STD, split={"test_sites": ["A1"]})
    assert _dp_site(tiny_cohort_dir, training).standardisers(training)["A0"].source == "dp"


def test_missing_clip_under_dp_is_refused_naming_the_key(tiny_cohort_dir):
    cfg = tiny_experiment(local_dp=DP, data={"site_standardise": "features"})
    with pytest.raises(ConfigError, match="data.feature_clip: site_standardise 'features' under statistics privacy"):
        _dp_site(tiny_cohort_dir, cfg).preprocess(cfg)


def test_a_checkpoint_of_other_inputs_is_refused_and_a_missing_site_is_an_error(tiny_cohort_dir):
    check_checkpoint({"site_standardise": "features"}, "features", "pub.pt")
    with pytest.raises(ConfigError, match=r"pub.pt: federation.init_checkpoint was trained with "
                                          r"data.site_standardise 'none', this run has 'features'"):
        check_checkpoint({}, "features", "pub.pt")  # written before the option: "none"
    cfg = tiny_experiment(data=STD)
    cohort = load_data_dir(str(tiny_cohort_dir), cfg.data)
    idx = cohort.site_indices("A1")
    ds = make_dataset(cfg, cohort, idx, prepare(cfg, cohort, idx), train=False,
                      standardisers=exact_standardisers(cohort, cohort.site_indices("A0")))
    with pytest.raises(KeyError, match="site 'A1' has no standardiser"):
        ds[0]


def test_a_federation_from_a_checkpoint_of_other_inputs_stops_before_any_release(tiny_cohort_dir, tmp_path):
    from umeml.client.app import SimulatedSites, build_client_app
    from umeml.data.source import CohortSource
    from umeml.data.splits import make_split
    from umeml.server.coordinator import Coordinator
    from umeml.train.central import train_central

    from fed_helpers import LocalGrid

    plain = tiny_experiment(rounds=1, train_sites=["A0", "A1"], min_train_sites=2)
    cohort = load_data_dir(str(tiny_cohort_dir), plain.data)
    train_central(plain, cohort, tmp_path / "public", split=make_split(cohort, ("A0",), 1, 0.2, 0, ("A2",)),
                  progress=False)  # trained without standardisation
    cfg = tiny_experiment(rounds=1, local_dp=DP, train_sites=["A0", "A1"], min_train_sites=2, data=STD,
                          init_checkpoint=str(tmp_path / "public" / "checkpoints" / "best.pt"))
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(tiny_cohort_dir)), "cpu",
                                          state_root=str(tmp_path / "sites")))
    with pytest.raises(ConfigError, match="trained with data.site_standardise 'none', this run has 'features'"):
        Coordinator(cfg, tmp_path / "run", expected_sites=3, held_out=("A2",), wait_timeout=5,
                    printer=lambda s: None).run(LocalGrid(app, 3))
    assert not list((tmp_path / "sites").rglob("privacy.json"))  # no site released anything for it
