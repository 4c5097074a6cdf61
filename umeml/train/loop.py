"""The local training and evaluation loop, shared by the centralized trainer and federated sites.

Nothing here knows about Flower: a site's ClientApp calls these functions on its own data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from umeml.config import ExperimentConfig, TrainConfig
from umeml.data.batch import Batch
from umeml.train.losses import survival_risk, task_loss


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def task_heads(cfg: ExperimentConfig, n_subtypes: int) -> dict[str, int]:
    """Output size of each task head of the experiment."""
    sizes = {"grade": len(cfg.data.grades), "subtype": n_subtypes, "survival": cfg.survival.n_bins}
    return {t: sizes[t] for t in cfg.tasks}


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with momentum as the config says, at ``train.lr x lr_scale`` (a
    federated round's factor of the round-level schedule, :mod:`umeml.federation.schedule`).

    SGD suits DP-SGD better than Adam: Adam rescales every coordinate to unit step size, so on
    coordinates where the noise dominates it takes full-size random steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr * float(lr_scale)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base learning rate, then cosine decay to zero."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EarlyStopping:
    """Stop when the validation score has not improved for ``patience`` epochs (None: never).

    Guarded for small data: no stop before ``min_epochs`` (the warm-up epochs plus the
    patience: during warm-up the learning rate is still rising, and a noisy first score must not
    end the run), and a non-finite score never counts as an improvement.
    """

    patience: int | None
    min_epochs: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    stale: int = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record ``epoch``'s score; True when it is the best so far."""
        if math.isfinite(score) and score > self.best:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            return True
        self.stale += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        """Whether training stops after ``epoch``."""
        return self.patience is not None and epoch >= self.min_epochs and self.stale >= self.patience


@dataclass
class LossSettings:
    """What the loss needs besides the batch: tasks, class weights, survival alpha."""

    tasks: tuple[str, ...]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    survival_alpha: float = 0.15

    def to(self, device: torch.device) -> "LossSettings":
        """Move the class weights to ``device``."""
        return LossSettings(self.tasks, {k: v.to(device) for k, v in self.weights.items()}, self.survival_alpha)


def batch_loss(model: nn.Module, batch: Batch, loss: LossSettings) -> torch.Tensor:
    """Per-sample total loss (B,): task losses plus the model's auxiliary loss."""
    output = model(*batch.model_inputs())
    return task_loss(output, batch, loss.tasks, loss.weights, loss.survival_alpha)


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss: LossSettings,
    device: torch.device,
    scheduler=None,
    grad_accum: int = 1,
    amp: bool = False,
    extra_loss=None,
) -> dict:
    """One pass over ``loader``; returns the mean loss and the number of samples and steps.

    ``extra_loss(model)`` adds a parameter-only term (FedProx) to every step. Empty batches
    (Poisson sampling under DP) are skipped without an optimizer step.
    """
    model.train()
    total, n, steps = 0.0, 0, 0
    use_amp = amp and device.type == "cuda"
    optimizer.zero_grad(set_to_none=True)
    pending = 0
    for batch in loader:
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            per_sample = batch_loss(model, batch, loss)
            value = per_sample.mean()
            if extra_loss is not None:
                value = value + extra_loss(model)
        (value / grad_accum).backward()
        pending += 1
        total += float(per_sample.detach().sum())
        n += len(batch)
        if pending == grad_accum:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            pending, steps = 0, steps + 1
    if pending:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        steps += 1
    return {"loss": total / max(n, 1), "num_examples": n, "steps": steps}


@dataclass
class Predictions:
    """Per-patient outputs and targets of an evaluation pass (stays on the site)."""

    probs: dict[str, np.ndarray]
    risk: np.ndarray | None
    targets: dict[str, np.ndarray]
    times: np.ndarray
    censorship: np.ndarray
    loss: float

    def __len__(self) -> int:
        return len(self.times)


@torch.no_grad()
def predict(model: nn.Module, loader, loss: LossSettings, device: torch.device) -> Predictions:
    """Run the model over ``loader`` in eval mode, collecting probabilities, risks and targets."""
    model.eval()
    probs: dict[str, list] = {t: [] for t in loss.tasks if t != "survival"}
    risks, times, cens, total = [], [], [], 0.0
    targets: dict[str, list] = {"grade": [], "subtype": [], "survival_bin": []}
    for batch in loader:
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        output = model(*batch.model_inputs())
        total += float(task_loss(output, batch, loss.tasks, loss.weights, loss.survival_alpha).sum())
        for t in probs:
            probs[t].append(torch.softmax(output.logits[t].float(), dim=1).cpu().numpy())
        if "survival" in loss.tasks:
            risks.append(survival_risk(output.logits["survival"].float()).cpu().numpy())
        for k in targets:
            targets[k].append(getattr(batch, k).cpu().numpy())
        times.append(batch.survival_months.cpu().numpy())
        cens.append(batch.censorship.cpu().numpy())

    def cat(parts, width=None):
        if parts:
            return np.concatenate(parts)
        return np.zeros((0, width)) if width else np.zeros(0)

    n = sum(len(t) for t in times)
    return Predictions(
        probs={t: cat(v, 1) for t, v in probs.items()},
        risk=cat(risks) if "survival" in loss.tasks else None,
        targets={k: cat(v).astype(np.int64) for k, v in targets.items()},
        times=cat(times),
        censorship=cat(cens).astype(np.int64),
        loss=total / max(n, 1),
    )
