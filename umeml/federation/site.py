"""A hospital site's side of the protocol, free of Flower: answer queries, train, evaluate.

The ClientApp is a thin adapter that turns Flower messages into calls of :class:`SiteRuntime`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from umeml import __version__
from umeml.config import ExperimentConfig
from umeml.data.cohort import Cohort
from umeml.data.dataset import CohortDataset, GenomicScaler, genomic_moments, make_loader
from umeml.data.splits import stratified_train_val
from umeml.federation.protocol import Preprocessing, survival_grid
from umeml.model import build_model
from umeml.train.evaluate import evaluate_predictions
from umeml.train.loop import LossSettings, make_optimizer, predict, resolve_device, train_epoch


@dataclass
class SiteRuntime:
    """One site's data and the operations the coordinator may ask of it."""

    site_id: str
    cohort: Cohort
    indices: np.ndarray
    k_min: int = 10
    device: str = "auto"
    max_local_epochs: int = 1000

    @property
    def n(self) -> int:
        """Number of patients at the site."""
        return int(len(self.indices))

    def _split(self, cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
        return stratified_train_val(self.cohort, self.indices, cfg.split.val_fraction, cfg.seed)

    def handshake(self) -> dict:
        """Identity, version, schema and aggregate counts (label counts only at >= k patients)."""
        c, idx = self.cohort, self.indices
        reply = {
            "site": self.site_id,
            "umeml_version": __version__,
            "n_patients": self.n,
            "feature_dim": int(c.feature_dim or 0),
            "encoder": c.encoder,
            "group_sizes": list(c.gene_groups.sizes),
            "subtypes": list(c.subtypes),
            "grades": list(c.grades),
            "with_pathology": int(c.has_path[idx].sum()) if self.n else 0,
            "with_genomics": int(c.has_genomics[idx].sum()) if self.n else 0,
        }
        if self.n >= self.k_min:
            reply["subtype_counts"] = np.bincount([c.subtype_index(i) for i in idx], minlength=len(c.subtypes)).tolist()
            reply["grade_counts"] = np.bincount([c.grade_index(i) for i in idx], minlength=len(c.grades)).tolist()
        return reply

    def preprocess(self, cfg: ExperimentConfig) -> dict:
        """Aggregates of the site's training patients for standardisation, bins and class weights."""
        train, _ = self._split(cfg)
        if len(train) < self.k_min:
            return {"site": self.site_id, "suppressed": True, "n": int(len(train))}
        c = self.cohort
        times, events = c.times_events(train)
        grid = survival_grid()
        hist, _ = np.histogram(np.clip(times[events == 1], 0, grid[-1] - 1e-9), bins=grid)
        reply = {
            "site": self.site_id,
            "n": int(len(train)),
            "survival_hist": hist.astype(int).tolist(),
            "grade_counts": np.bincount([c.grade_index(i) for i in train], minlength=len(c.grades)).tolist(),
            "subtype_counts": np.bincount([c.subtype_index(i) for i in train], minlength=len(c.subtypes)).tolist(),
        }
        if c.gene_groups.dim and c.has_genomics[train].any():
            count, total, total_sq = genomic_moments(c, train)
            reply.update(genomic_count=count.tolist(), genomic_sum=total.tolist(), genomic_sumsq=total_sq.tolist())
        return reply

    def _dataset(self, cfg: ExperimentConfig, prep: Preprocessing, idx: np.ndarray, train: bool) -> CohortDataset:
        scaler = None
        if prep.genomic_mean is not None:
            scaler = GenomicScaler(np.asarray(prep.genomic_mean, np.float32), np.asarray(prep.genomic_std, np.float32))
        return CohortDataset(
            self.cohort, idx, np.asarray(prep.survival_edges), scaler,
            max_patches=cfg.data.max_patches, train=train, seed=cfg.seed,
            use_pathology="pathology" in cfg.model.modalities, use_genomics="genomics" in cfg.model.modalities,
        )

    def build_model(self, cfg: ExperimentConfig, prep: Preprocessing):
        """The federation's architecture (identical at every site so weights average)."""
        if list(self.cohort.subtypes) != list(prep.subtypes) or list(self.cohort.grades) != list(prep.grades):
            raise ValueError(
                f"site {self.site_id}: class order differs from the coordinator's "
                f"(subtypes {list(self.cohort.subtypes)} vs {prep.subtypes}); labels would be misread"
            )
        return build_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)

    def _loss(self, cfg: ExperimentConfig, prep: Preprocessing) -> LossSettings:
        weights = {t: torch.tensor(w, dtype=torch.float32) for t, w in prep.class_weights.items()}
        return LossSettings(tuple(cfg.tasks), weights, cfg.survival.alpha)

    def train(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict, server_round: int,
              proximal_mu: float = 0.0) -> tuple[dict, dict]:
        """Local epochs from the global weights; returns new weights and aggregate metrics.

        With ``proximal_mu`` > 0 the FedProx term mu/2 ||w - w_global||^2 is added to each step.
        """
        t0 = time.perf_counter()
        device = resolve_device(self.device)
        model = self.build_model(cfg, prep)
        model.load_state_dict(state)
        model.to(device)
        train_idx, _ = self._split(cfg)
        ds = self._dataset(cfg, prep, train_idx, train=True)
        loader = make_loader(ds, cfg.train.batch_size, True, cfg.seed + server_round, cfg.train.num_workers)
        optimizer = make_optimizer(model, cfg.train)
        loss = self._loss(cfg, prep).to(device)
        extra = None
        if proximal_mu > 0:
            anchor = [p.detach().clone() for p in model.parameters()]

            def extra(m):
                return 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

        stats = {"loss": 0.0, "num_examples": 0, "steps": 0}
        for epoch in range(min(cfg.federation.local_epochs, self.max_local_epochs)):
            ds.set_epoch(server_round * 1000 + epoch)
            stats = train_epoch(model, loader, optimizer, loss, device, None, cfg.train.grad_accum, cfg.train.amp, extra)
        new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return new_state, {"train_loss": stats["loss"], "num-examples": int(len(train_idx)), "steps": stats["steps"],
                           "seconds": round(time.perf_counter() - t0, 3)}

    def evaluate(self, cfg: ExperimentConfig, prep: Preprocessing, state: dict, part: str, n_boot: int) -> dict:
        """Metrics of the given weights on the site's ``part`` (all, or its local validation split)."""
        idx = self.indices if part == "all" else self._split(cfg)[1]
        if len(idx) < self.k_min:
            return {"site": self.site_id, "part": part, "n": int(len(idx)), "suppressed": True}
        t0 = time.perf_counter()
        device = resolve_device(self.device)
        model = self.build_model(cfg, prep)
        model.load_state_dict(state)
        model.to(device)
        loader = make_loader(self._dataset(cfg, prep, idx, train=False), cfg.train.batch_size, False, 0)
        preds = predict(model, loader, self._loss(cfg, prep).to(device), device)
        metrics = evaluate_predictions(preds, cfg.tasks, n_boot=n_boot, seed=cfg.seed)
        return {"site": self.site_id, "part": part, "n": int(len(idx)), "loss": preds.loss, "tasks": metrics,
                "seconds": round(time.perf_counter() - t0, 3)}
