"""Centralized training (``umeml train``): the reference every federated run is compared with."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from umeml import __version__
from umeml.config import ExperimentConfig, dump_config
from umeml.data.cohort import Cohort
from umeml.data.dataset import CohortDataset, make_loader
from umeml.data.site_norm import check_checkpoint
from umeml.data.splits import Split, make_split
from umeml.metrics.coverage import cohort_missing_classes, missing_class_message
from umeml.model import save_checkpoint
from umeml.model.io import init_from_checkpoint
from umeml.model.parts import apply_trainable
from umeml.rundir import CentralizedFinal, EpochRecord, RunDir, atomic_write_text, write_final, write_metrics
from umeml.train.evaluate import evaluate_predictions, selection_score
from umeml.train.experiment import Preprocessing, build_model, loss_settings, make_dataset, prepare
from umeml.train.loop import (
    EarlyStopping,
    LossSettings,
    cosine_with_warmup,
    make_optimizer,
    predict,
    resolve_device,
    train_epoch,
)

log = logging.getLogger(__name__)


def _checkpoint_meta(cfg: ExperimentConfig, cohort: Cohort, prep: Preprocessing, split: Split) -> dict:
    """What every checkpoint of the run carries beside the weights (bins, classes, scaler)."""
    meta = {"experiment": cfg.name, "umeml_version": __version__, "survival_edges": prep.edges.tolist(),
            "subtypes": list(cohort.subtypes), "grades": list(cohort.grades), "test_sites": list(split.test_sites),
            "site_standardise": cfg.data.site_standardise}
    if prep.scaler is not None:
        meta["genomic_mean"] = prep.scaler.mean.tolist()
        meta["genomic_std"] = prep.scaler.std.tolist()
    return meta


@dataclass
class _Fit:
    """What the epoch loop and the final test work on, built once by :func:`train_central`."""

    cfg: ExperimentConfig
    out: RunDir
    model: torch.nn.Module
    train_ds: CohortDataset
    loaders: dict
    loss: LossSettings
    device: torch.device
    split: Split
    meta: dict


def train_central(cfg: ExperimentConfig, cohort: Cohort, out_dir: str | Path, split: Split | None = None,
                  progress: bool = True) -> dict:
    """Train on the training split, select on validation, report held-out test metrics.

    Writes the run directory (resolved config, metrics.csv, final.json, checkpoints) and
    returns the content of final.json.
    """
    out = RunDir(Path(out_dir))
    out.checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    split = split or make_split(cohort, cfg.split.test_sites, cfg.split.n_test_sites, cfg.split.val_fraction, cfg.seed,
                                cfg.federation.train_sites)
    if "pathology" in cfg.model.modalities and cohort.bag_dir is None:
        log.warning("no feature bags: pathology is missing for every patient (the model uses its missing-modality token)")
    for task, missing in cohort_missing_classes(cohort, split.test, cfg.tasks).items():
        log.warning("%s", missing_class_message("the test sites " + ", ".join(split.test_sites), task, missing))
    atomic_write_text(out.config, dump_config(cfg))
    device = resolve_device(cfg.train.device)
    prep = prepare(cfg, cohort, split.train)
    model = build_model(cfg, prep)
    if cfg.federation.init_checkpoint:  # e.g. a model trained on a public cohort
        meta = init_from_checkpoint(model, cfg.federation.init_checkpoint)
        check_checkpoint(meta, cfg.data.site_standardise, cfg.federation.init_checkpoint)
        log.info("initial weights from %s", cfg.federation.init_checkpoint)
    apply_trainable(model, cfg.train.trainable)
    model = model.to(device)
    train_ds = make_dataset(cfg, cohort, split.train, prep, train=True)
    loaders = {
        "train": make_loader(train_ds, cfg.train.batch_size, True, cfg.seed, cfg.train.num_workers),
        **{part: make_loader(make_dataset(cfg, cohort, idx, prep, False), cfg.train.batch_size, False, 0,
                             cfg.train.num_workers)
           for part, idx in (("val", split.val), ("test", split.test))},
    }
    fit = _Fit(cfg, out, model, train_ds, loaders, loss_settings(cfg, prep).to(device), device, split,
               _checkpoint_meta(cfg, cohort, prep, split))
    t0 = time.perf_counter()
    epochs, best_epoch = _train_epochs(fit, progress)
    test_metrics = _test(fit, cohort)
    final = CentralizedFinal(
        experiment=cfg.name, model=cfg.model.name, umeml_version=__version__, seed=cfg.seed,
        test_sites=list(split.test_sites),
        n_train=int(len(split.train)), n_val=int(len(split.val)), n_test=int(len(split.test)),
        best_epoch=best_epoch, epochs_run=len(epochs), wall_seconds=round(time.perf_counter() - t0, 2),
        test=test_metrics,
    )
    write_final(out, final)
    return final.to_json()


def _train_epochs(fit: _Fit, progress: bool) -> tuple[list[EpochRecord], int]:
    """Train until the last epoch or early stopping, keeping ``last.pt`` and the best epoch's
    ``best.pt`` and rewriting metrics.csv after every epoch; returns the epochs and the best one."""
    cfg = fit.cfg
    optimizer = make_optimizer(fit.model, cfg.train)
    steps_per_epoch = max(1, -(-len(fit.train_ds) // (cfg.train.batch_size * cfg.train.grad_accum)))
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch)
    records: list[EpochRecord] = []
    patience = cfg.train.early_stopping_patience
    stopper = EarlyStopping(patience, cfg.train.warmup_epochs + (patience or 0))
    bar = tqdm(range(1, cfg.train.epochs + 1), desc=f"train {cfg.name}", disable=not progress, unit="epoch")
    for epoch in bar:
        record, score = _epoch(fit, optimizer, scheduler, epoch)
        records.append(record)
        write_metrics(fit.out.metrics, [row for r in records for row in r.metric_rows()])
        save_checkpoint(fit.out.last_checkpoint, fit.model, {**fit.meta, "epoch": epoch})
        if stopper.update(epoch, score) or epoch == 1:  # epoch 1: a best.pt exists even if no score is finite
            save_checkpoint(fit.out.best_checkpoint, fit.model, {**fit.meta, "epoch": epoch})
            stopper.best_epoch = stopper.best_epoch or epoch
        bar.set_postfix(loss=f"{record.train_loss:.3f}", val=f"{score:.3f}")
        if stopper.should_stop(epoch):
            log.info("early stopping at epoch %d (best %d)", epoch, stopper.best_epoch)
            break
    return records, stopper.best_epoch


def _epoch(fit: _Fit, optimizer, scheduler, epoch: int) -> tuple[EpochRecord, float]:
    """One training epoch and its validation pass; returns the record and the selection score
    (minus the training loss without a validation split)."""
    cfg = fit.cfg
    fit.train_ds.set_epoch(epoch)
    stats = train_epoch(fit.model, fit.loaders["train"], optimizer, fit.loss, fit.device, scheduler,
                        cfg.train.grad_accum, cfg.train.amp)
    record = EpochRecord(epoch, stats["loss"], optimizer.param_groups[0]["lr"],
                         n_train=int(len(fit.split.train)), n_val=int(len(fit.split.val)))
    if not len(fit.split.val):
        return record, -stats["loss"]
    preds = predict(fit.model, fit.loaders["val"], fit.loss, fit.device)
    record.val = evaluate_predictions(preds, cfg.tasks, n_boot=0, seed=cfg.seed)
    record.val_loss = preds.loss
    return record, selection_score(record.val, preds.loss, cfg.train.min_val_events)


def _test(fit: _Fit, cohort: Cohort) -> dict:
    """Test metrics (bootstrap CIs) of the best epoch's model; keeps the test predictions."""
    from umeml.model import load

    best_model, _ = load(fit.out.best_checkpoint, map_location=fit.device)
    preds = predict(best_model, fit.loaders["test"], fit.loss, fit.device)
    test_metrics = evaluate_predictions(preds, fit.cfg.tasks, n_boot=fit.cfg.train.bootstrap, seed=fit.cfg.seed)
    save_held_out(fit.out.root, preds, cohort, fit.split.test)
    return test_metrics


def save_held_out(run_dir: Path, preds, cohort: Cohort, indices: np.ndarray) -> None:
    """Keep the test patients' predictions in the run dir for the report's ROC and KM plots."""
    from umeml.report.predictions import class_names, save_predictions

    if len(preds) != len(indices):  # an evaluation that dropped patients cannot be aligned with sites
        log.warning("not saving predictions: %d predictions for %d test patients", len(preds), len(indices))
        return
    save_predictions(RunDir(Path(run_dir)).predictions, preds, class_names(cohort),
                     [cohort.patients[i].site for i in indices])
