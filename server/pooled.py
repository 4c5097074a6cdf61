"""Pooled metrics for simulations: the coordinator may see all data only when it is simulated."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from umeml.config import ExperimentConfig
from umeml.data.cohort import load_cohort, load_data_dir
from umeml.data.dataset import CohortDataset, GenomicScaler, make_loader
from umeml.federation.protocol import Preprocessing
from umeml.model import build_model
from umeml.train.central import save_held_out
from umeml.train.evaluate import evaluate_predictions
from umeml.train.loop import LossSettings, predict


def pooled_evaluator(run_config, cfg: ExperimentConfig, held_out: tuple[str, ...]) -> Callable | None:
    """A function scoring the global weights on all held-out patients pooled, or None when deployed.

    It also keeps the pooled predictions in the run dir (``predictions.npz``) for the report's
    ROC and Kaplan-Meier plots: a simulation holds every site's data anyway.
    """
    data_dir = str(run_config.get("sim-data-dir", ""))
    table = str(run_config.get("sim-table", ""))
    run_dir = str(run_config.get("run-dir", ""))
    if not (data_dir or table) or not held_out:
        return None

    def evaluate(weights: dict, prep: Preprocessing) -> dict:
        if data_dir:
            cohort = load_data_dir(data_dir, cfg.data)
        else:
            cohort = load_cohort(table, str(run_config.get("sim-signatures", "")) or None,
                                 str(run_config.get("sim-bags", "")) or None, cfg.data)
        idx = np.concatenate([cohort.site_indices(s) for s in held_out])
        scaler = None
        if prep.genomic_mean is not None:
            scaler = GenomicScaler(np.asarray(prep.genomic_mean, np.float32), np.asarray(prep.genomic_std, np.float32))
        ds = CohortDataset(cohort, idx, np.asarray(prep.survival_edges), scaler, train=False,
                           use_pathology="pathology" in cfg.model.modalities,
                           use_genomics="genomics" in cfg.model.modalities)
        model = build_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
        model.load_state_dict(weights)
        weights_t = {t: torch.tensor(w) for t, w in prep.class_weights.items()}
        preds = predict(model, make_loader(ds, cfg.train.batch_size, False, 0), LossSettings(tuple(cfg.tasks), weights_t, cfg.survival.alpha), torch.device("cpu"))
        if run_dir:
            save_held_out(Path(run_dir), preds, cohort, idx)
        return evaluate_predictions(preds, cfg.tasks, n_boot=cfg.train.bootstrap, seed=cfg.seed)

    return evaluate
