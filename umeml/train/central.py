"""Centralized training (``umeml train``): the reference every federated run is compared with."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from umeml import __version__
from umeml.config import ExperimentConfig, dump_config
from umeml.data.cohort import Cohort
from umeml.data.dataset import make_loader
from umeml.data.splits import Split, make_split
from umeml.model import save_checkpoint
from umeml.train.evaluate import evaluate_predictions, selection_score
from umeml.train.experiment import build_model, loss_settings, make_dataset, prepare
from umeml.train.loop import (
    cosine_with_warmup,
    make_optimizer,
    predict,
    resolve_device,
    train_epoch,
)

log = logging.getLogger(__name__)


def _write_rows(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _flat_metrics(prefix: str, metrics: dict) -> dict:
    out = {}
    for task, values in metrics.items():
        for name, m in values.items():
            if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                out[f"{prefix}{task}_{name}"] = m["value"]
    return out


def train_central(cfg: ExperimentConfig, cohort: Cohort, out_dir: str | Path, split: Split | None = None,
                  progress: bool = True) -> dict:
    """Train on the training split, select on validation, report held-out test metrics.

    Writes the run directory (resolved config, metrics.csv, final.json, checkpoints) and
    returns the content of final.json.
    """
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    split = split or make_split(cohort, cfg.split.test_sites, cfg.split.n_test_sites, cfg.split.val_fraction, cfg.seed,
                                cfg.federation.train_sites)
    if "pathology" in cfg.model.modalities and cohort.bag_dir is None:
        log.warning("no feature bags: pathology is missing for every patient (the model uses its missing-modality token)")
    (out / "config.yaml").write_text(dump_config(cfg))
    device = resolve_device(cfg.train.device)
    prep = prepare(cfg, cohort, split.train)
    model = build_model(cfg, prep).to(device)
    train_ds = make_dataset(cfg, cohort, split.train, prep, train=True)
    loaders = {
        "train": make_loader(train_ds, cfg.train.batch_size, True, cfg.seed, cfg.train.num_workers),
        "val": make_loader(make_dataset(cfg, cohort, split.val, prep, False), cfg.train.batch_size, False, 0, cfg.train.num_workers),
        "test": make_loader(make_dataset(cfg, cohort, split.test, prep, False), cfg.train.batch_size, False, 0, cfg.train.num_workers),
    }
    optimizer = make_optimizer(model, cfg.train)
    steps_per_epoch = max(1, -(-len(train_ds) // (cfg.train.batch_size * cfg.train.grad_accum)))
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch)
    loss = loss_settings(cfg, prep).to(device)
    meta = {"experiment": cfg.name, "umeml_version": __version__, "survival_edges": prep.edges.tolist(),
            "subtypes": list(cohort.subtypes), "grades": list(cohort.grades), "test_sites": list(split.test_sites)}
    if prep.scaler is not None:
        meta["genomic_mean"] = prep.scaler.mean.tolist()
        meta["genomic_std"] = prep.scaler.std.tolist()
    rows, best, best_epoch, stale = [], -np.inf, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.train.epochs + 1), desc=f"train {cfg.name}", disable=not progress, unit="epoch")
    for epoch in bar:
        train_ds.set_epoch(epoch)
        stats = train_epoch(model, loaders["train"], optimizer, loss, device, scheduler, cfg.train.grad_accum, cfg.train.amp)
        row = {"epoch": epoch, "train_loss": stats["loss"], "lr": optimizer.param_groups[0]["lr"]}
        score = -stats["loss"]
        if len(split.val):
            preds = predict(model, loaders["val"], loss, device)
            val_metrics = evaluate_predictions(preds, cfg.tasks, n_boot=0, seed=cfg.seed)
            row["val_loss"] = preds.loss
            row.update(_flat_metrics("val_", val_metrics))
            score = selection_score(val_metrics, preds.loss)
        rows.append(row)
        _write_rows(out / "metrics.csv", rows)
        save_checkpoint(out / "checkpoints" / "last.pt", model, {**meta, "epoch": epoch})
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            save_checkpoint(out / "checkpoints" / "best.pt", model, {**meta, "epoch": epoch})
        else:
            stale += 1
        bar.set_postfix(loss=f"{stats['loss']:.3f}", val=f"{score:.3f}")
        patience = cfg.train.early_stopping_patience
        if patience is not None and stale >= patience:
            log.info("early stopping at epoch %d (best %d)", epoch, best_epoch)
            break
    from umeml.model import load

    best_model, _ = load(out / "checkpoints" / "best.pt", map_location=device)
    preds = predict(best_model, loaders["test"], loss, device)
    test_metrics = evaluate_predictions(preds, cfg.tasks, n_boot=cfg.train.bootstrap, seed=cfg.seed)
    save_held_out(out, preds, cohort, split.test)
    final = {
        "experiment": cfg.name,
        "mode": "centralized",
        "model": cfg.model.name,
        "umeml_version": __version__,
        "seed": cfg.seed,
        "test_sites": list(split.test_sites),
        "n_train": int(len(split.train)), "n_val": int(len(split.val)), "n_test": int(len(split.test)),
        "best_epoch": best_epoch,
        "epochs_run": len(rows),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "test": test_metrics,
    }
    (out / "final.json").write_text(json.dumps(final, indent=2))
    return final


def save_held_out(run_dir: Path, preds, cohort: Cohort, indices: np.ndarray) -> None:
    """Keep the test patients' predictions in the run dir for the report's ROC and KM plots."""
    from umeml.report.predictions import PREDICTIONS_FILE, class_names, save_predictions

    if len(preds) != len(indices):  # an evaluation that dropped patients cannot be aligned with sites
        log.warning("not saving predictions: %d predictions for %d test patients", len(preds), len(indices))
        return
    save_predictions(Path(run_dir) / PREDICTIONS_FILE, preds, class_names(cohort),
                     [cohort.patients[i].site for i in indices])
