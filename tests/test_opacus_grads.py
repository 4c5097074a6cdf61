"""Opacus per-sample gradients equal gradients computed one patient at a time, for every model.

This is what makes DP-SGD exact: Opacus clips each patient's gradient, so it must see each
patient's true gradient. Run in train mode (Opacus hooks only record in train mode) with
dropout and drop-path at 0, in float64 so the comparison can be tight.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule

from umeml.config import ModelConfig
from umeml.data.batch import Batch
from umeml.model import available_models, build_model, register_dp_grad_samplers
from umeml.train.losses import task_loss

D = 10
GROUPS = (3, 4, 2)
HEADS = {"grade": 3, "survival": 4}
B = 5

VARIANTS = [(name, {}) for name in available_models()] + [
    ("umeml", {"use_cross_attention": False, "fusion": "bilinear"}),
    ("umeml", {"use_registers": False, "modularity_block": 2}),
    ("umeml", {"modalities": ("pathology",)}),
    ("umeml", {"modalities": ("genomics",)}),
    ("late_fusion", {"fusion": "bilinear"}),
    ("linear", {"modalities": ("genomics",)}),
    ("linear", {"survival_head": "proportional"}),
    ("linear", {"linear_rank": 3}),
    ("linear", {"linear_rank": 2, "modalities": ("genomics",)}),
    ("umeml", {"survival_head": "proportional"}),
    ("umeml", {"spatial_context": "neighbours"}),
    ("umeml", {"spatial_context": "neighbours", "spatial_radius": 2, "use_cross_attention": False}),
    ("umeml", {"spatial_context": "neighbours", "spatial_gate_init": 0.5}),  # an open gate: proj's grads nonzero
]
IDS = [name + "".join(f"-{k}={v}" for k, v in extra.items()) for name, extra in VARIANTS]


def make_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    m = 6
    features = torch.randn(B, m, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, m, dtype=torch.bool)
    mask[1, 3:] = False  # padded
    mask[3, 1:] = False  # one patch
    has_path = torch.tensor([True, True, False, True, True])
    has_gen = torch.tensor([True, False, True, True, True])
    features[~has_path] = 0.0
    mask[~has_path] = False
    genomics = torch.randn(B, sum(GROUPS), generator=g, dtype=torch.float64) * has_gen[:, None]
    # a 3 x 2 patch grid (256 px patches) per bag, in another order per bag; padding at (0, 0)
    cells = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]], dtype=torch.float64) * 256
    coords = torch.stack([cells[torch.randperm(m, generator=g)] for _ in range(B)]) * mask[..., None]
    return Batch(
        coords=coords,
        features=features,
        patch_mask=mask,
        genomics=genomics,
        has_path=has_path,
        has_genomics=has_gen,
        grade=torch.tensor([0, 2, 1, -1, 1]),
        subtype=torch.full((B,), -1),
        survival_bin=torch.tensor([0, 3, 1, 2, -1]),
        survival_months=torch.rand(B, generator=g, dtype=torch.float64) * 50,
        censorship=torch.tensor([0, 1, 0, 1, 0]),
    )


def select(batch: Batch, i: int) -> Batch:
    return Batch(**{k: None if v is None else v[i : i + 1] for k, v in vars(batch).items()})


def per_sample_loss(model, batch: Batch) -> torch.Tensor:
    weights = {"grade": torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)}
    return task_loss(model(*batch.model_inputs()), batch, tuple(HEADS), weights, 0.15)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # first layer's input needs no grad
@pytest.mark.parametrize("name,extra", VARIANTS, ids=IDS)
def test_per_sample_gradients_match(name, extra):
    cfg = ModelConfig(
        name=name, hidden_dim=16, n_heads=2, n_prototypes=3, n_registers=2,
        dropout=0.0, drop_path=0.0, gamma=1.0, tau=0.5, **extra,
    )
    torch.manual_seed(0)
    model = build_model(cfg, D, GROUPS, HEADS).double().train()
    batch = make_batch()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about its secure-RNG default
        register_dp_grad_samplers()
        gsm = GradSampleModule(model)
    loss = per_sample_loss(gsm, batch)
    assert loss.shape == (B,)
    loss.mean().backward()
    grad_samples = {}
    for pname, p in model.named_parameters():
        assert p.grad_sample is not None, f"{pname}: Opacus produced no per-sample gradient"
        assert p.grad_sample.shape == (B, *p.shape), pname
        grad_samples[pname] = p.grad_sample.detach().clone()
    gsm._close()  # remove hooks; the plain model is used below

    for i in range(B):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, select(batch, i)).sum().backward()
        for pname, p in model.named_parameters():
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grad_samples[pname][i], expected, atol=1e-10, rtol=1e-8,
                                       msg=lambda m, pname=pname, i=i: f"{pname}[{i}]: {m}")
