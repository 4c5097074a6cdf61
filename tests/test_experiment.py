"""One prepared experiment: the centralized trainer, a site and the pooled simulation metrics build
the same model, datasets and loss from one Preprocessing (the type saved as preprocessing.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from umeml.data.cohort import load_data_dir
from umeml.data.dataset import GenomicScaler, make_loader
from umeml.data.labels import survival_bin_edges
from umeml.data.source import CohortSource
from umeml.federation.protocol import Preprocessing as WirePreprocessing
from umeml.federation.protocol import check_handshakes, combine_preprocessing
from umeml.federation.site import SiteRuntime, local_training_seed
from umeml.server.pooled import pooled_evaluator
from umeml.train import central
from umeml.train.evaluate import evaluate_predictions
from umeml.train.experiment import Preprocessing, build_model, loss_settings, make_dataset, prepare
from umeml.train.loop import make_optimizer, predict, task_heads, train_epoch
from umeml.train.losses import class_weights_from_counts

from fed_helpers import tiny_experiment

# preprocessing.json as coordinators wrote it before the type moved (its exact key set)
OLD_PREPROCESSING_JSON = json.dumps({
    "survival_edges": [10.5, 22.0, 41.25], "genomic_mean": [0.5, -1.0], "genomic_std": [1.0, 2.0],
    "class_weights": {"grade": [1.0, 0.5, 2.0]}, "heads": {"grade": 3, "survival": 4}, "feature_dim": 16,
    "group_sizes": [1, 1], "subtypes": ["ASTR", "OAST"], "grades": ["II", "III", "IV"]})


@pytest.fixture(scope="module")
def setting(tiny_cohort_dir):
    cfg = tiny_experiment(bootstrap=20)
    cohort = load_data_dir(tiny_cohort_dir, cfg.data)
    sites = {s: SiteRuntime(s, cohort, cohort.site_indices(s), k_min=5, device="cpu") for s in cohort.sites}
    schema = check_handshakes({s: r.handshake() for s, r in sites.items()}, sites["A0"].handshake()["umeml_version"])
    prep = combine_preprocessing({s: sites[s].preprocess(cfg) for s in ("A0", "A1")}, schema,
                                 task_heads(cfg, len(schema["subtypes"])), cfg.survival.n_bins)
    torch.manual_seed(0)
    weights = build_model(cfg, prep).state_dict()
    return cfg, cohort, sites, prep, weights


def test_one_type_old_files_load(setting):
    assert WirePreprocessing is Preprocessing and central.prepare is prepare
    old = Preprocessing.from_json(OLD_PREPROCESSING_JSON)
    assert old.heads == {"grade": 3, "survival": 4} and old.to_json() == OLD_PREPROCESSING_JSON
    assert old.edges.tolist() == [10.5, 22.0, 41.25] and old.scaler.std.dtype == np.float32
    _, _, _, prep, _ = setting
    assert Preprocessing.from_json(prep.to_json()) == prep
    with pytest.raises(ValueError, match="preprocessing: expected the keys"):
        Preprocessing.from_json(json.dumps({**json.loads(OLD_PREPROCESSING_JSON), "extra": 1}))


def test_centralized_prepare_keeps_its_numbers(setting):
    """Bins, scaler and class weights are what the centralized trainer always fitted, exactly."""
    cfg, cohort, _, _, _ = setting
    idx = np.concatenate([cohort.site_indices("A0"), cohort.site_indices("A1")])
    prep = prepare(cfg, cohort, idx)
    json.dumps(json.loads(prep.to_json()))  # plain JSON like the federation's
    times, events = cohort.times_events(idx)
    np.testing.assert_array_equal(prep.edges, survival_bin_edges(times, events, cfg.survival.n_bins))
    fitted = GenomicScaler.fit(cohort, idx)
    np.testing.assert_array_equal(prep.scaler.mean, fitted.mean)
    np.testing.assert_array_equal(prep.scaler.std, fitted.std)
    grades = np.bincount([cohort.grade_index(i) for i in idx], minlength=len(cohort.grades))
    torch.testing.assert_close(loss_settings(cfg, prep).weights["grade"], class_weights_from_counts(grades),
                               rtol=0, atol=0)
    assert prep.heads == task_heads(cfg, len(cohort.subtypes)) and prep.group_sizes == list(cohort.gene_groups.sizes)


def test_site_and_central_build_the_same_model_and_training(setting):
    cfg, cohort, sites, prep, weights = setting
    torch.manual_seed(3)
    central_model = build_model(cfg, prep)
    torch.manual_seed(3)
    site_model = sites["A0"].build_model(cfg, prep)
    assert central_model.state_dict().keys() == site_model.state_dict().keys()
    assert all(torch.equal(v, site_model.state_dict()[k]) for k, v in central_model.state_dict().items())

    # one local epoch by hand, from the shared factories, equals the site's own training
    new, _ = sites["A0"].train(cfg, prep, weights, server_round=1)
    torch.manual_seed(local_training_seed(cfg.seed, "A0", 1))
    model = build_model(cfg, prep)
    model.load_state_dict(weights)
    train_idx, _ = sites["A0"]._split(cfg)
    ds = make_dataset(cfg, cohort, train_idx, prep, train=True)
    ds.set_epoch(1000)
    optimizer = make_optimizer(model, cfg.train)
    loader = make_loader(ds, cfg.train.batch_size, True, cfg.seed + 1)
    train_epoch(model, loader, optimizer, loss_settings(cfg, prep), torch.device("cpu"), None, 1, cfg.train.amp)
    assert all(torch.equal(v, new[k]) for k, v in model.state_dict().items())


def test_site_pooled_and_central_evaluate_identically(setting, tiny_cohort_dir, tmp_path):
    cfg, cohort, sites, prep, weights = setting
    site = sites["A2"].evaluate(cfg, prep, weights, "all", cfg.train.bootstrap)
    pooled = pooled_evaluator({**CohortSource(data_dir=str(tiny_cohort_dir)).settings(), "run-dir": str(tmp_path)},
                              cfg, ("A2",))(weights, prep)
    model = build_model(cfg, prep)
    model.load_state_dict(weights)
    ds = make_dataset(cfg, cohort, cohort.site_indices("A2"), prep, train=False)
    preds = predict(model, make_loader(ds, cfg.train.batch_size, False, 0), loss_settings(cfg, prep),
                    torch.device("cpu"))
    by_hand = evaluate_predictions(preds, cfg.tasks, n_boot=cfg.train.bootstrap, seed=cfg.seed)
    assert site["tasks"] == pooled == by_hand
    assert site["loss"] == preds.loss
    assert (tmp_path / "predictions.npz").is_file()
