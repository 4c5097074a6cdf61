"""Pooled metrics for simulations: the coordinator may see all data only when it is simulated."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from umeml.config import ExperimentConfig
from umeml.data.dataset import make_loader
from umeml.data.source import CohortSource
from umeml.train.central import save_held_out
from umeml.train.evaluate import evaluate_predictions
from umeml.train.experiment import Preprocessing, build_model, loss_settings, make_dataset
from umeml.train.loop import predict


def pooled_evaluator(run_config, cfg: ExperimentConfig, held_out: tuple[str, ...]) -> Callable | None:
    """A function scoring the global weights on all held-out patients pooled, or None when deployed.

    The cohort is the one the simulation's ``sim-*`` settings name (:meth:`CohortSource.settings`).
    It also keeps the pooled predictions in the run dir (``predictions.npz``) for the report's
    ROC and Kaplan-Meier plots: a simulation holds every site's data anyway.
    """
    source = CohortSource.from_settings(run_config)
    run_dir = str(run_config.get("run-dir", ""))
    if source is None or not held_out:
        return None

    def evaluate(weights: dict, prep: Preprocessing) -> dict:
        cohort = source.load(cfg.data, cfg.tasks)
        idx = np.concatenate([cohort.site_indices(s) for s in held_out])
        model = build_model(cfg, prep)
        model.load_state_dict(weights)
        loader = make_loader(make_dataset(cfg, cohort, idx, prep, train=False), cfg.train.batch_size, False, 0)
        preds = predict(model, loader, loss_settings(cfg, prep), torch.device("cpu"))
        if run_dir:
            save_held_out(Path(run_dir), preds, cohort, idx)
        return evaluate_predictions(preds, cfg.tasks, n_boot=cfg.train.bootstrap, seed=cfg.seed)

    return evaluate
