"""Label-skew-aware local training that needs no protocol change (site-side only).

FedLC (Zhang et al., "Federated Learning with Label Distribution Skew via Logits Calibration",
ICML 2022): at a site that holds few (or no) patients of a class, plain cross-entropy pushes
that class's logit down for every patient, and the averaged model inherits each site's local
prior (client drift under label skew: in TCGA GBM-LGG, GBM and LGG come from different tissue
source sites). FedLC trains on calibrated logits ``z_c - tau * n_c^(-1/4)``, ``n_c`` the
site's own training count of class c: a rare class's logit is handicapped during training, so
the raw logits must carry more evidence for it and are less biased towards the local majority.
Predictions use the raw logits. ``n_c = 0`` would give an infinite offset (the class drops out
of the softmax); the count is clamped at 1 so an absent class gets the largest finite offset,
``-tau``, and its logit still receives the (weaker) push down.

The offsets are a function of the site's exact class counts; they never leave the site, and
they are refused with local DP (the DP-SGD guarantee is for a loss fixed before the data).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from umeml.data.labels import label_counts
from umeml.model.blocks import ModelOutput

CALIBRATED_TASKS = ("grade", "subtype")


def calibration_offsets(counts, tau: float) -> torch.Tensor:
    """FedLC's per-class logit offsets ``-tau * max(n_c, 1)^(-1/4)`` for a site's class counts."""
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.tensor(-float(tau) * n ** -0.25, dtype=torch.float32)


def site_offsets(cohort, train_idx, tasks, tau: float) -> dict[str, torch.Tensor]:
    """Offsets of the classification tasks among ``tasks`` from the site's training patients'
    labels (unknown labels, index -1, are not counted)."""
    out = {}
    for task in tasks:
        if task == "grade":
            out[task] = calibration_offsets(label_counts([cohort.grade_index(i) for i in train_idx],
                                                         len(cohort.grades)), tau)
        elif task == "subtype":
            out[task] = calibration_offsets(label_counts([cohort.subtype_index(i) for i in train_idx],
                                                         len(cohort.subtypes)), tau)
    return out


class CalibratedLogits(nn.Module):
    """``model`` whose classification logits are shifted by fixed per-class offsets (training
    only: the loss sees the calibrated logits; the wrapped model's weights are what is sent)."""

    def __init__(self, model: nn.Module, offsets: dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.offsets = {task: off.detach() for task, off in offsets.items()}

    def forward(self, *inputs) -> ModelOutput:
        """The wrapped model's output with ``logits[task] + offsets[task]``."""
        out = self.model(*inputs)
        logits = dict(out.logits)
        for task, off in self.offsets.items():
            if task in logits:
                logits[task] = logits[task] + off.to(device=logits[task].device, dtype=logits[task].dtype)
        return ModelOutput(logits=logits, aux_loss=out.aux_loss, attention=out.attention)
