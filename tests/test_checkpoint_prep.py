"""Issue 17: a federation fine-tuning a public checkpoint uses the preprocessing the checkpoint
was trained with (survival bins, genomic standardisation), and its sites release no survival
histogram or genomic moments; the class weights stay the private sites'."""

import dataclasses
import json

import pytest

from umeml.client.app import SimulatedSites, build_client_app
from umeml.config import ConfigError
from umeml.data.cohort import load_data_dir
from umeml.data.source import CohortSource
from umeml.data.splits import make_split
from umeml.federation.checkpoint_prep import checkpoint_preprocessing
from umeml.federation.site import SiteRuntime
from umeml.model import build_model, load, save_checkpoint
from umeml.server.coordinator import Coordinator
from umeml.train.central import train_central

from fed_helpers import LocalGrid, tiny_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DP = {"enabled": True, "target_epsilon": 8.0}


def test_auto_takes_the_preprocessing_from_a_given_checkpoint_only():
    assert tiny_experiment(init_checkpoint="pub.pt").federation.preprocessing_from_checkpoint
    assert tiny_experiment(init_checkpoint="pub.pt").federation.genomics_from_checkpoint
    assert not tiny_experiment().federation.preprocessing_from_checkpoint
    assert not tiny_experiment(init_checkpoint="pub.pt", preprocessing_source="sites").federation \
        .preprocessing_from_checkpoint
    assert tiny_experiment(preprocessing_source="checkpoint").federation.preprocessing_from_checkpoint


def _schema(cohort):
    return {"feature_dim": int(cohort.feature_dim), "group_sizes": list(cohort.gene_groups.sizes),
            "subtypes": list(cohort.subtypes), "grades": list(cohort.grades)}


def test_a_checkpoint_without_the_preprocessing_is_refused_naming_every_key(tiny_cohort_dir, tmp_path):
    cfg = tiny_experiment()
    cohort = load_data_dir(str(tiny_cohort_dir), cfg.data)
    schema, heads = _schema(cohort), {"grade": len(cohort.grades), "subtype": len(cohort.subtypes), "survival": 4}
    model = build_model(cfg.model, schema["feature_dim"], tuple(schema["group_sizes"]), heads)
    bare = save_checkpoint(tmp_path / "bare.pt", model, {"survival_edges": [1.0, 2.0], "grades": ["x"]})
    with pytest.raises(ConfigError) as err:
        checkpoint_preprocessing(str(bare), schema, heads, 4, {}, [])
    text = str(err.value)
    assert text.startswith(f"{bare}: federation.preprocessing_source")
    assert all(k in text for k in ("survival_edges: survival.n_bins is 4, the checkpoint was trained with 3 bins",
                                   "grades: the checkpoint's classes ['x'] differ", "genomic_mean / genomic_std",
                                   "preprocessing_source: sites"))
    with pytest.raises(ConfigError, match="needs federation.init_checkpoint"):
        checkpoint_preprocessing(None, schema, heads, 4, {}, [])


def test_a_dp_federation_from_a_checkpoint_uses_its_preprocessing_and_releases_nothing(tiny_cohort_dir, tmp_path,
                                                                                        monkeypatch):
    cfg = tiny_experiment(rounds=1, local_dp=DP, train_sites=["A0", "A1"], min_train_sites=2,
                          train={"trainable": "heads"})
    cohort = load_data_dir(str(tiny_cohort_dir), cfg.data)
    # the public checkpoint: held-out A2's patients (another label mix and survival than A0/A1's)
    public_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, trainable="all"),
                                     federation=dataclasses.replace(cfg.federation, train_sites=("A2",)))
    train_central(public_cfg, cohort, tmp_path / "public", split=make_split(cohort, ("A0",), 1, 0.2, 0, ("A2",)),
                  progress=False)
    path = tmp_path / "public" / "checkpoints" / "best.pt"
    _, meta = load(path)
    released = []
    histogram = SiteRuntime._released_histogram
    monkeypatch.setattr(SiteRuntime, "_released_histogram", lambda *a: released.append(a) or histogram(*a))
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, init_checkpoint=str(path)))
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(tiny_cohort_dir)), "cpu",
                                          state_root=str(tmp_path / "sites")))
    final = Coordinator(cfg, tmp_path / "run", expected_sites=3, held_out=("A2",), wait_timeout=5,
                        printer=lambda s: None).run(LocalGrid(app, 3))
    prep = json.loads((tmp_path / "run" / "preprocessing.json").read_text())
    assert released == []  # no site released a survival histogram
    assert prep["survival_edges"] == meta["survival_edges"]
    assert prep["genomic_mean"] == meta["genomic_mean"] and prep["genomic_std"] == meta["genomic_std"]
    totals = final["privacy"]["total"]
    assert set(totals) == {"A0", "A1"}
    for t in totals.values():  # DP-SGD and the class counts only
        assert sorted(r["kind"] for r in t["releases"]) == ["class_counts", "dp_sgd"] and t["epsilon"] <= 8.0 + 1e-6
    # the ledger says where the bins and the scale came from (no histogram release to say it)
    notes = json.loads((tmp_path / "run" / "privacy.json").read_text())["preprocessing_notes"]
    assert any(n.startswith("survival bins and genomic standardisation: the public checkpoint's") for n in notes), notes


def test_a_site_refuses_releases_that_take_its_whole_budget(tiny_cohort_dir, tmp_path):
    # at target 1 the default class counts (epsilon 1.5) were released anyway: total 1.50 > 1, no DP-SGD step left
    from umeml.federation.stats_release import StatsPrivacyRefusal

    # set by hand: the "auto" default scales with the target instead (test_stats_release)
    cfg = tiny_experiment(local_dp={"enabled": True, "target_epsilon": 1.0}, init_checkpoint="pub.pt",
                          stats_privacy={"class_counts_epsilon": 1.5})
    cohort = load_data_dir(str(tiny_cohort_dir), cfg.data)
    site = SiteRuntime("A0", cohort, cohort.site_indices("A0"), k_min=5, dp=cfg.federation.local_dp,
                       state_dir=str(tmp_path / "A0"), dp_seed=1)
    with pytest.raises(StatsPrivacyRefusal, match=r"site A0: dp.target_epsilon is 1 .*class counts .*at epsilon 1.5"):
        site.preprocess(cfg)
    assert not (tmp_path / "A0" / "privacy.json").exists()  # refused before anything was released
    low = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, stats_privacy=dataclasses.replace(cfg.federation.stats_privacy, class_counts_epsilon=0.25)))
    assert [r["kind"] for r in site.preprocess(low)["releases"]] == ["class_counts"]
