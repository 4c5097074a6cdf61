"""The proportional survival head (``model.survival_head: proportional``): one risk direction
shared by the time bins, so the risk score is monotone in it, with the parameters it claims, for
every model of the registry, and it learns the toy problem the linear model's test uses."""

from __future__ import annotations

import pytest
import torch

from tests.test_linear_model import GROUPS, HEADS, D, fit_toy
from umeml.config import ConfigError, config_from_dict
from umeml.model import available_models, build_model
from umeml.model.blocks import ProportionalHazards, TaskHeads
from umeml.train.losses import survival_risk


def test_the_risk_is_monotone_in_the_shared_direction():
    torch.manual_seed(0)
    head = ProportionalHazards(6, 4)
    with torch.no_grad():
        head.baseline.tokens.copy_(torch.tensor([[-2.0, 0.5, -1.0, 1.5]]))
    z = torch.randn(200, 6)
    score = head.risk(z).squeeze(1)
    risk = survival_risk(head(z))
    assert torch.equal(torch.argsort(score), torch.argsort(risk))
    assert sum(p.numel() for p in head.parameters()) == 6 + 4


def test_a_free_head_per_bin_need_not_be_monotone():
    """Why the option exists: when the late bins' weights point against the first bin's, the risk
    rises and falls along that direction (no direction orders the patients)."""
    heads = TaskHeads(1, {"survival": 4})
    with torch.no_grad():
        heads.heads["survival"].weight.copy_(torch.tensor([[1.0], [-3.0], [-3.0], [-3.0]]))
        heads.heads["survival"].bias.zero_()
    risk = survival_risk(heads(torch.linspace(-3, 3, 61)[:, None])["survival"])
    steps = risk.diff()
    assert (steps > 0).any() and (steps < 0).any()


@pytest.mark.parametrize("name", available_models())
def test_every_model_builds_the_proportional_head(name):
    model_cfg = config_from_dict({"model": {"name": name, "hidden_dim": 16, "survival_head": "proportional"}}).model
    model = build_model(model_cfg, D, GROUPS, HEADS)
    names = {n for n, _ in model.named_parameters()}
    assert {"heads.heads.survival.risk.weight", "heads.heads.survival.baseline.tokens"} <= names
    assert "heads.heads.survival.weight" not in names
    assert "heads.heads.grade.weight" in names  # the classification heads are untouched


def test_an_unknown_survival_head_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="survival_head"):
        config_from_dict({"model": {"survival_head": "cox"}})


def test_the_linear_model_learns_the_toy_survival_order_with_the_proportional_head():
    cfg = config_from_dict({"model": {"name": "linear", "survival_head": "proportional"}}).model
    torch.manual_seed(0)
    model = build_model(cfg, D, GROUPS, HEADS)
    _, c_index = fit_toy(model)
    assert c_index >= 0.9, c_index
