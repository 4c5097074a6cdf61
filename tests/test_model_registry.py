"""One loop over every registered model (timm style) plus UMEML's ablation switches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from umeml.config import ModelConfig
from umeml.data.batch import PatientItem, collate
from umeml.errors import ConfigError
from umeml.model import (
    UMEML,
    ModelOutput,
    available_models,
    build_model,
    load,
    register_model,
    save_checkpoint,
)

D = 12
GROUPS = (3, 4, 2)
HEADS = {"grade": 3, "subtype": 6, "survival": 4}

# Every registered model, plus the ablations worth covering in the same loop.
VARIANTS = [(name, {}) for name in available_models()] + [
    ("umeml", {"use_cross_attention": False}),
    ("umeml", {"use_modularity": False}),
    ("umeml", {"use_registers": False}),
    ("umeml", {"fusion": "bilinear"}),
    ("umeml", {"modalities": ("pathology",)}),
    ("umeml", {"modalities": ("genomics",)}),
    ("late_fusion", {"fusion": "bilinear"}),
    ("linear", {"modalities": ("pathology",)}),
    ("linear", {"modalities": ("genomics",)}),
    ("umeml", {"spatial_context": "neighbours"}),
    ("umeml", {"spatial_context": "neighbours", "use_cross_attention": False, "spatial_radius": 2}),
    ("umeml", {"spatial_context": "neighbours", "modalities": ("pathology",)}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in extra.items()) for name, extra in VARIANTS]


def make_cfg(name: str, **extra) -> ModelConfig:
    base = dict(name=name, hidden_dim=16, n_heads=2, n_prototypes=3, n_registers=2, dropout=0.0, drop_path=0.0,
                gamma=1.0, tau=0.5)
    base.update(extra)
    return ModelConfig(**base)


def make_model(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(make_cfg(name, **extra), D, GROUPS, HEADS)


def patients(n: int, seed: int = 0, sizes=None) -> list[PatientItem]:
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [int(torch.randint(1, 9, (1,), generator=g)) for _ in range(n)]
    out = []
    for m in sizes:
        side = 3  # patches on a 3-wide grid of 224 px cells, in random order
        cells = torch.randperm(m, generator=g)
        coords = (torch.stack([cells % side, cells // side], dim=1) * 224 + 1000).numpy()
        out.append(
            PatientItem(
                coords=coords,
                features=torch.randn(m, D, generator=g).numpy(),
                genomics=torch.randn(sum(GROUPS), generator=g).numpy(),
                grade=0, subtype=1, survival_bin=2, survival_months=10.0, censorship=0,
            )
        )
    return out


def run(model, batch):
    return model(*batch.model_inputs())


def cat_logits(out: ModelOutput) -> torch.Tensor:
    return torch.cat([out.logits[k] for k in sorted(out.logits)], dim=1)


def test_registry_names_and_duplicate_error():
    assert {"umeml", "abmil", "snn", "late_fusion", "linear"} <= set(available_models())
    with pytest.raises(ValueError, match="already registered"):
        register_model("umeml")(UMEML)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(ModelConfig(name="nope"), D, GROUPS, HEADS)


@pytest.mark.parametrize("name,extra", VARIANTS, ids=IDS)
def test_forward_backward_shapes(name, extra):
    model = make_model(name, **extra).train()
    batch = collate(patients(4), D, sum(GROUPS))
    out = run(model, batch)
    assert set(out.logits) == set(HEADS)
    for task, n_out in HEADS.items():
        assert out.logits[task].shape == (4, n_out)
        assert torch.isfinite(out.logits[task]).all()
    assert out.aux_loss.shape == (4,)
    loss = cat_logits(out).pow(2).sum() + out.aux_loss.sum()
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient: {unused}"
    if name == "umeml" and extra.get("use_modularity", True) and extra.get("modalities") != ("genomics",):
        assert (out.aux_loss != 0).any(), "the modularity loss should be active"
    else:
        assert (out.aux_loss == 0).all()


@pytest.mark.parametrize("name,extra", VARIANTS, ids=IDS)
def test_padded_batch_equals_single_bags(name, extra):
    model = make_model(name, **extra).eval()
    items = patients(3, seed=1, sizes=[1, 7, 3])  # includes a bag of one patch
    with torch.no_grad():
        batched = run(model, collate(items, D, sum(GROUPS)))
        for i, item in enumerate(items):
            single = run(model, collate([item], D, sum(GROUPS)))
            torch.testing.assert_close(cat_logits(single)[0], cat_logits(batched)[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(single.aux_loss[0], batched.aux_loss[i], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,extra", VARIANTS, ids=IDS)
def test_empty_batch(name, extra):
    model = make_model(name, **extra).train()
    batch = collate([], D, sum(GROUPS))
    out = run(model, batch)
    for task, n_out in HEADS.items():
        assert out.logits[task].shape == (0, n_out)
    assert out.aux_loss.shape == (0,)
    (cat_logits(out).sum() + out.aux_loss.sum()).backward()


@pytest.mark.parametrize("name,extra", VARIANTS, ids=IDS)
def test_missing_modality_uses_token(name, extra):
    model = make_model(name, **extra).train()
    items = patients(3, seed=2)
    items[0] = dataclasses.replace(items[0], features=None)
    items[1] = dataclasses.replace(items[1], genomics=None)
    batch = collate(items, D, sum(GROUPS))
    out = run(model, batch)
    logits = cat_logits(out)
    assert torch.isfinite(logits).all() and torch.isfinite(out.aux_loss).all()
    (logits.pow(2).sum() + out.aux_loss.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the missing input's values are never read: changing them changes nothing
    model.eval()
    with torch.no_grad():
        ref = cat_logits(run(model, batch))
        batch.features[0] = 100.0  # patient 0 has no pathology
        batch.genomics[1] = -50.0  # patient 1 has no genomics
        torch.testing.assert_close(cat_logits(run(model, batch)), ref)
    # the missing-modality token drives the prediction: changing it changes the output
    uses_path = name in ("umeml", "abmil", "late_fusion", "linear") and extra.get("modalities") != ("genomics",)
    token_names = [n for n, _ in model.named_parameters() if "missing" in n]
    assert token_names
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "missing" in n:  # random, not constant: LayerNorm ignores a constant shift
                p.add_(torch.randn_like(p))
        changed = cat_logits(run(model, batch))
    patient = 0 if uses_path else 1
    assert not torch.allclose(changed[patient], ref[patient])


def test_all_masked_bag_with_has_path_true_gives_no_nan():
    model = make_model("umeml").train()
    batch = collate(patients(2, seed=3), D, sum(GROUPS))
    batch.patch_mask[0] = False  # claims pathology but no real patch
    out = run(model, batch)
    loss = cat_logits(out).sum() + out.aux_loss.sum()
    loss.backward()
    assert torch.isfinite(cat_logits(out)).all()
    assert out.aux_loss[0] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name,extra", VARIANTS, ids=IDS)
def test_save_load_round_trip(name, extra, tmp_path):
    model = make_model(name, **extra)
    with torch.no_grad():  # move off the initial values so the test sees loaded weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    batch = collate(patients(3, seed=4), D, sum(GROUPS))
    path = save_checkpoint(tmp_path / "m.pt", model, {"epoch": 3, "tasks": ["grade"], "auc": 0.7})
    raw = torch.load(path, weights_only=True)
    assert raw["model"]["heads"] == HEADS
    loaded, meta = load(path)
    assert meta == {"epoch": 3, "tasks": ["grade"], "auc": 0.7}
    assert type(loaded) is type(model)
    assert loaded.build_spec == model.build_spec
    with torch.no_grad():
        a, b = run(model, batch), run(loaded, batch)
    assert torch.equal(cat_logits(a), cat_logits(b))
    assert torch.equal(a.aux_loss, b.aux_loss)


def test_save_rejects_non_plain_meta(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "m.pt", make_model("snn"), {"bad": object()})


def test_patch_assignments_are_soft_and_masked():
    model = make_model("umeml").eval()
    batch = collate(patients(2, seed=5, sizes=[2, 6]), D, sum(GROUPS))
    with torch.no_grad():
        s = model.patch_assignments(batch.features, batch.patch_mask)
    assert s.shape == (2, 3, 6)
    torch.testing.assert_close(s.sum(1), batch.patch_mask.float())


def test_genomics_width_checked():
    model = make_model("umeml")
    batch = collate(patients(2), D, sum(GROUPS))
    with pytest.raises(ValueError, match="gene groups"):
        model(batch.features, batch.patch_mask, batch.genomics[:, :-1], batch.has_path, batch.has_genomics)
