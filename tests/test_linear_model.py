"""The ``linear`` model learns a linearly separable toy problem, through the usual loss path and
from a config that names it."""

from __future__ import annotations

import numpy as np
import torch

from umeml.config import config_from_dict
from umeml.data.batch import PatientItem, collate
from umeml.metrics.survival import concordance_index
from umeml.model import LinearBaseline, build_model
from umeml.train.loop import LossSettings, batch_loss
from umeml.train.losses import survival_risk

D = 8
GROUPS = (3, 4)
HEADS = {"grade": 3, "survival": 4}


def toy_patients(n: int, seed: int) -> list[PatientItem]:
    """Grade c in {0, 1, 2} shifts the patch features along one direction and the genomics along
    another; a third of the patients lack one modality (the other still tells the class).
    Survival bin 3 - c at 10 (3 - c) months, uncensored: a higher grade dies sooner (ties within
    a grade are not comparable pairs)."""
    rng = np.random.default_rng(seed)
    mu = np.eye(3, D) * 3.0
    nu = np.eye(3, sum(GROUPS)) * 3.0
    items = []
    for i in range(n):
        c = int(rng.integers(3))
        m = int(rng.integers(2, 9))
        features = (rng.normal(size=(m, D)) + mu[c]).astype(np.float32)
        genomics = (0.5 * rng.normal(size=sum(GROUPS)) + nu[c]).astype(np.float32)
        if i % 3 == 1:
            features = None
        elif i % 3 == 2:
            genomics = None
        items.append(PatientItem(features, genomics, c, -1, 3 - c, float(10 * (3 - c)), 0))
    return items


def fit_toy(model) -> tuple[float, float]:
    """Train ``model`` full-batch with Adam on the toy problem; its test grade accuracy and c-index."""
    train = collate(toy_patients(150, seed=1), D, sum(GROUPS))
    test = collate(toy_patients(150, seed=2), D, sum(GROUPS))
    loss = LossSettings(tuple(HEADS))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        batch_loss(model, train, loss).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(*test.model_inputs())
    accuracy = float((out.logits["grade"].argmax(1) == test.grade).float().mean())
    risk = survival_risk(out.logits["survival"]).numpy()
    return accuracy, concordance_index(test.survival_months.numpy(), test.censorship.numpy(), risk)


def test_linear_learns_a_separable_toy_problem():
    cfg = config_from_dict({"model": {"name": "linear"}}).model  # a config can name it
    torch.manual_seed(0)
    model = build_model(cfg, D, GROUPS, HEADS)
    assert isinstance(model, LinearBaseline)
    assert sum(p.numel() for p in model.parameters()) == (D + sum(GROUPS) + 1) * 7 + D + sum(GROUPS)
    accuracy, c_index = fit_toy(model)
    # chance is 1/3 and 0.5; an oracle gets ~1.0 on this margin-3 problem
    assert accuracy >= 0.95, accuracy
    assert c_index >= 0.9, c_index
