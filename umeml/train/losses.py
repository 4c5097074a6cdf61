"""Task losses (design section 6), all per sample (B,) so that DP-SGD can clip per patient.

- Grading / classification: class-weighted cross-entropy; label -1 (unknown) gives loss 0.
- Survival: discrete-time hazards NLL of MCAT/PORPOISE/SurvPath (``nll_loss`` in their code),
  computed in log space.
- :func:`task_loss` sums the tasks' losses and the model's auxiliary loss (gamma * L_mod).

The trainer takes the mean over the batch. A class-weighted per-sample loss ``w_y * CE`` is
used instead of PyTorch's weighted mean (which divides by the batch's sum of weights and so is
not a per-sample quantity); with ``w_c = N / (C n_c)`` the weights average 1 over the training
set, so the scale matches unweighted cross-entropy.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "class_counts",
    "class_weights_from_counts",
    "survival_nll",
    "survival_risk",
    "survival_from_logits",
    "task_loss",
    "weighted_cross_entropy",
]

_TARGETS = {"grade": "grade", "subtype": "subtype"}


def class_counts(labels: Iterable[int] | np.ndarray | torch.Tensor, n_classes: int) -> np.ndarray:
    """Number of samples per class (length ``n_classes``); labels equal to -1 are ignored."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else list(labels), dtype=np.int64)
    y = y[y >= 0]
    if y.size and y.max() >= n_classes:
        raise ValueError(f"label {int(y.max())} is out of range for {n_classes} classes")
    return np.bincount(y, minlength=n_classes)


def class_weights_from_counts(counts: Iterable[int] | np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights ``w_c = N / (C n_c)`` over the C classes present.

    A class with no sample gets weight 0 (it cannot occur in training anyway). The weights
    average to 1 over the samples counted, so the loss scale does not change.
    """
    counts = np.asarray(list(counts) if not isinstance(counts, np.ndarray) else counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if present.any():
        weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample ``w[y_i] * CE(logits_i, y_i)`` (B,); 0 where ``y_i == -1``."""
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=-1, reduction="none")


def survival_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hazards ``h = sigmoid(logits)`` and survival ``S_k = prod_{j<=k} (1 - h_j)``, both (B, n_bins)."""
    hazards = torch.sigmoid(logits)
    return hazards, torch.cumprod(1.0 - hazards, dim=1)


def survival_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk score ``-sum_k S_k`` (B,): higher = shorter expected survival."""
    return -survival_from_logits(logits)[1].sum(dim=1)


def survival_nll(
    logits: torch.Tensor, bins: torch.Tensor, censorship: torch.Tensor, alpha: float = 0.15
) -> torch.Tensor:
    """Discrete-time survival NLL per sample (B,), MCAT/SurvPath style.

    With hazards ``h = sigmoid(z)``, ``S_k = prod_{j<=k}(1 - h_j)``, ``S_{-1} = 1``, true bin
    ``y`` and censorship ``c`` (1 = censored)::

        uncensored = -(1 - c) * (log S_{y-1} + log h_y)
        censored   = -c * log S_y
        loss       = (1 - alpha) * (censored + uncensored) + alpha * uncensored

    The logs are computed as ``log h = logsigmoid(z)`` and ``log(1 - h) = logsigmoid(-z)`` (no
    eps clamp needed; MCAT clamps at 1e-7, which only matters for saturated hazards).
    Samples with ``y == -1`` (unknown) get loss 0.
    """
    known = bins >= 0
    y = bins.clamp_min(0).long().unsqueeze(1)
    c = censorship.to(logits.dtype)
    log_h = F.logsigmoid(logits)
    log_surv = torch.cumsum(F.logsigmoid(-logits), dim=1)  # log S_k
    log_surv_prev = torch.cat([log_surv.new_zeros(log_surv.shape[0], 1), log_surv], dim=1)  # log S_{k-1}
    uncensored = -(1.0 - c) * (log_surv_prev.gather(1, y).squeeze(1) + log_h.gather(1, y).squeeze(1))
    censored = -c * log_surv.gather(1, y).squeeze(1)
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
    return torch.where(known, loss, torch.zeros_like(loss))


def task_loss(
    output,
    batch,
    tasks: Iterable[str],
    class_weights: Mapping[str, torch.Tensor] | None = None,
    survival_alpha: float = 0.15,
) -> torch.Tensor:
    """Total per-sample loss (B,): sum over ``tasks`` of their losses, plus ``output.aux_loss``.

    ``output`` is a :class:`~umeml.model.ModelOutput`, ``batch`` a :class:`~umeml.data.batch.Batch`.
    Tasks: ``grade`` and ``subtype`` (weighted CE, weights from ``class_weights[task]`` if given),
    ``survival`` (:func:`survival_nll` on ``survival_bin`` and ``censorship``).
    """
    class_weights = class_weights or {}
    total = output.aux_loss
    for task in tasks:
        total = total + single_task_loss(output, batch, task, class_weights.get(task), survival_alpha).to(total.dtype)
    return total


def single_task_loss(output, batch, task: str, class_weight: torch.Tensor | None = None,
                     survival_alpha: float = 0.15) -> torch.Tensor:
    """Per-sample loss (B,) of one task's head, without ``output.aux_loss`` (the terms of
    :func:`task_loss`, one at a time: a per-head decision reads its own head's loss)."""
    if task not in output.logits:
        raise KeyError(f"the model has no head for task {task!r} (heads: {sorted(output.logits)})")
    logits = output.logits[task]
    if task == "survival":
        return survival_nll(logits, batch.survival_bin, batch.censorship, survival_alpha)
    if task in _TARGETS:
        return weighted_cross_entropy(logits, getattr(batch, _TARGETS[task]), class_weight)
    raise ValueError(f"unknown task {task!r}")
