"""Losses against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from umeml.data.batch import Batch
from umeml.model import ModelOutput
from umeml.train.losses import (
    class_counts,
    class_weights_from_counts,
    survival_nll,
    survival_risk,
    task_loss,
    weighted_cross_entropy,
)


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_class_counts_and_weights():
    counts = class_counts([0, 0, 0, 1, -1, 2, 2, -1], 4)
    assert counts.tolist() == [3, 1, 2, 0]
    w = class_weights_from_counts(counts)
    # N / (C n_c) over the 3 present classes, 0 for the absent one
    torch.testing.assert_close(w, torch.tensor([6 / 9, 6 / 3, 6 / 6, 0.0]))
    assert float((w[[0, 0, 0, 1, 2, 2]]).mean()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        class_counts([5], 3)


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    target = torch.tensor([0, 2, -1])
    w = torch.tensor([1.0, 2.0, 3.0])
    loss = weighted_cross_entropy(logits, target, w)
    lse0 = math.log(math.exp(2) + 1 + math.exp(-1))
    expected = [1.0 * (lse0 - 2.0), 3.0 * math.log(3.0), 0.0]
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(weighted_cross_entropy(logits, target)[:2], torch.tensor([lse0 - 2.0, math.log(3.0)]))


def test_survival_nll_by_hand():
    z = torch.tensor([[0.3, -0.2, 1.0, 0.1], [0.3, -0.2, 1.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    bins = torch.tensor([2, 1, -1])
    cens = torch.tensor([0, 1, 0])
    alpha = 0.15
    loss = survival_nll(z, bins, cens, alpha)
    h = [sig(v) for v in (0.3, -0.2, 1.0, 0.1)]
    s = np.cumprod([1 - x for x in h])
    # uncensored, bin 2: -(log S_1 + log h_2); loss = (1-a)*(unc) + a*unc = unc
    unc = -(math.log(s[1]) + math.log(h[2]))
    # censored, bin 1: -log S_1; loss = (1-a)*cens
    cen = -math.log(s[1])
    torch.testing.assert_close(loss, torch.tensor([unc, (1 - alpha) * cen, 0.0]))
    # bin 0, uncensored: S_{-1} = 1
    l0 = survival_nll(z[:1], torch.tensor([0]), torch.tensor([0]), alpha)
    torch.testing.assert_close(l0, torch.tensor([-math.log(h[0])]))


def test_survival_nll_matches_mcat_formula_with_clamp():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    c = torch.randint(0, 2, (8,), generator=g)
    alpha, eps = 0.4, 1e-7
    # MCAT's nll_loss, written as in their code base (hazards, S, padded S, clamped logs)
    hazards = torch.sigmoid(z)
    s = torch.cumprod(1 - hazards, dim=1)
    s_pad = torch.cat([torch.ones(8, 1), s], 1)
    yy, cc = y.unsqueeze(1), c.unsqueeze(1).float()
    unc = -(1 - cc) * (torch.log(s_pad.gather(1, yy).clamp(min=eps)) + torch.log(hazards.gather(1, yy).clamp(min=eps)))
    cen = -cc * torch.log(s_pad.gather(1, yy + 1).clamp(min=eps))
    mcat = ((1 - alpha) * (cen + unc) + alpha * unc).squeeze(1)
    torch.testing.assert_close(survival_nll(z, y, c, alpha), mcat, atol=1e-5, rtol=1e-5)


def test_survival_risk():
    z = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    s1 = [0.5, 0.25]
    h = sig(2.0)
    s2 = [1 - h, (1 - h) ** 2]
    torch.testing.assert_close(survival_risk(z), torch.tensor([-sum(s1), -sum(s2)]))
    assert survival_risk(z)[1] > survival_risk(z)[0]  # higher hazards = higher risk


def test_task_loss_sums_tasks_and_aux():
    b = 3
    out = ModelOutput(
        logits={"grade": torch.randn(b, 3), "subtype": torch.randn(b, 6), "survival": torch.randn(b, 4)},
        aux_loss=torch.tensor([0.1, 0.2, 0.3]),
    )
    batch = Batch(
        features=torch.zeros(b, 1, 2), patch_mask=torch.ones(b, 1, dtype=torch.bool), genomics=torch.zeros(b, 2),
        has_path=torch.ones(b, dtype=torch.bool), has_genomics=torch.ones(b, dtype=torch.bool),
        grade=torch.tensor([0, 1, -1]), subtype=torch.tensor([5, -1, 0]), survival_bin=torch.tensor([1, 2, 3]),
        survival_months=torch.ones(b), censorship=torch.tensor([0, 1, 1]),
    )
    w = {"grade": torch.tensor([1.0, 2.0, 3.0])}
    total = task_loss(out, batch, ("grade", "subtype", "survival"), w, 0.2)
    expected = (
        out.aux_loss
        + weighted_cross_entropy(out.logits["grade"], batch.grade, w["grade"])
        + weighted_cross_entropy(out.logits["subtype"], batch.subtype)
        + survival_nll(out.logits["survival"], batch.survival_bin, batch.censorship, 0.2)
    )
    torch.testing.assert_close(total, expected)
    assert total.shape == (b,)
    only = task_loss(out, batch, ("grade",), w, 0.2)
    torch.testing.assert_close(only, out.aux_loss + weighted_cross_entropy(out.logits["grade"], batch.grade, w["grade"]))
    with pytest.raises(KeyError):
        task_loss(ModelOutput({"grade": out.logits["grade"]}, out.aux_loss), batch, ("survival",))


def test_empty_batch_losses():
    z = torch.zeros(0, 4, requires_grad=True)
    assert survival_nll(z, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert weighted_cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).shape == (0,)
