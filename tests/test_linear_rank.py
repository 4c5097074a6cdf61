"""``model.linear_rank``: the linear model's bottleneck, trained on public data, frozen under
``train.trainable: heads`` (no gradient, not in the update a site sends)."""

import pytest
import torch

from umeml.config import config_from_dict
from umeml.errors import ConfigError
from umeml.model.parts import apply_trainable, update_keys
from umeml.model.registry import build_model


def _linear(rank):
    cfg = config_from_dict({"model": {"name": "linear", "modalities": ["genomics"], "linear_rank": rank}}).model
    return build_model(cfg, 0, (5, 7), {"grade": 3, "survival": 4})


def test_the_bottleneck_maps_to_rank_dimensions_and_heads_alone_train_and_travel():
    full, low = _linear(0), _linear(4)
    assert full.project is None and low.project.weight.shape == (4, 12)
    n = lambda m: sum(p.numel() for p in m.heads.parameters())  # noqa: E731
    assert n(low) == 4 * 7 + 7 and n(full) == 12 * 7 + 7  # grade 3 + survival 4 outputs, with biases
    trained = apply_trainable(low, "heads")
    assert trained and all(name.startswith("heads.") for name in trained)
    assert not low.project.weight.requires_grad
    assert "project.weight" not in update_keys(low, "heads") and "project.weight" in update_keys(low, "all")
    g = torch.randn(6, 12)
    out = low(torch.zeros(6, 1, 1), torch.zeros(6, 1), g, torch.zeros(6), torch.ones(6))
    assert out.logits["grade"].shape == (6, 3)


def test_a_negative_rank_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="linear_rank"):
        config_from_dict({"model": {"name": "linear", "linear_rank": -1}})
