"""Spatial context (model.spatial_context): grid neighbours, their mean, the model switch, the data
path that brings coords to the model, and the config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from umeml.config import ModelConfig, load_config
from umeml.data.bags import read_coords, read_features
from umeml.data.batch import PatientItem, collate
from umeml.data.cohort import load_data_dir
from umeml.data.dataset import SLIDE_GAP, CohortDataset, merge_slide_coords
from umeml.errors import ConfigError
from umeml.model import build_model
from umeml.model.spatial import SpatialContext, grid_neighbours, grid_step, neighbour_mean

P = 256  # patch size of the hand-built grids


def neighbour_sets(nbrs: torch.Tensor, m: int) -> list[list[set[int]]]:
    """Per bag and patch, the set of neighbour positions within the bag (flat index - b * m)."""
    out = []
    for b in range(nbrs.shape[0]):
        out.append([{int(j) - b * m for j in row if j >= 0} for row in nbrs[b]])
    return out


def hand_grid():
    """Bag 0: a 2 x 2 block at cells (0,0) (1,0) (0,1) (1,1), an isolated patch at (5,5), one padded
    slot. Bag 1: one patch, at the same cell as bag 0's first (bags must never mix). Bag 2: none."""
    coords = torch.tensor([
        [[0, 0], [P, 0], [0, P], [P, P], [5 * P, 5 * P], [0, 0]],
        [[0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]],
        [[0, 0]] * 6,
    ], dtype=torch.float32) + 1000.0  # an offset: cells are relative to the bag's corner
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 0] = True
    return coords, mask


def test_grid_neighbours_on_a_hand_built_grid():
    coords, mask = hand_grid()
    nbrs = grid_neighbours(coords, mask, radius=1)
    assert nbrs.shape == (3, 6, 8)
    sets = neighbour_sets(nbrs, 6)
    assert sets[0][:4] == [{1, 2, 3}, {0, 2, 3}, {0, 1, 3}, {0, 1, 2}]  # the block, diagonals included
    assert sets[0][4] == set()  # isolated
    assert sets[0][5] == set()  # padding has no neighbours ...
    assert all(5 not in s for s in sets[0])  # ... and is nobody's neighbour
    assert sets[1] == [set()] * 6  # a bag of one patch; bag 0's patches at the same cell are not its
    assert sets[2] == [set()] * 6  # a bag without patches


def test_radius_two_reaches_two_cells_and_step_is_inferred():
    coords = torch.tensor([[[0, 0], [2 * P, 0], [3 * P, P], [6 * P, 0]]], dtype=torch.float32)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert float(grid_step(coords, mask)[0]) == P
    one = neighbour_sets(grid_neighbours(coords, mask, radius=1), 4)[0]
    two = neighbour_sets(grid_neighbours(coords, mask, radius=2), 4)[0]
    assert one == [set(), {2}, {1}, set()]
    assert two == [{1}, {0, 2}, {1}, set()]
    with pytest.raises(ValueError, match="radius"):
        grid_neighbours(coords, mask, radius=0)


def test_grid_step_without_two_distinct_coordinates():
    one = torch.tensor([[[512.0, 512.0]]])
    assert grid_neighbours(one, torch.ones(1, 1, dtype=torch.bool)).shape == (1, 1, 8)
    assert float(grid_step(one, torch.ones(1, 1, dtype=torch.bool))[0]) == 1.0
    empty = grid_neighbours(torch.zeros(0, 0, 2), torch.zeros(0, 0, dtype=torch.bool))
    assert empty.shape == (0, 0, 8)


def test_neighbour_mean_and_context_update():
    coords, mask = hand_grid()
    h = torch.randn(3, 6, 4)
    mean, has = neighbour_mean(h, grid_neighbours(coords, mask))
    torch.testing.assert_close(mean[0, 0], h[0, 1:4].mean(0))
    assert has[0].tolist() == [True, True, True, True, False, False]
    assert not has[1:].any() and (mean[0, 4:] == 0).all()
    torch.manual_seed(0)
    ctx = SpatialContext(4, radius=1)
    out = ctx(h, coords, mask)
    assert out.shape == h.shape
    torch.testing.assert_close(out[~has], h[~has])  # isolated, padded and lone patches unchanged
    assert not torch.allclose(out[0, :4], h[0, :4])
    with pytest.raises(ValueError, match="coords must be"):
        ctx(h, coords[:, :, :1], mask)


def bags(seed: int = 0) -> list[PatientItem]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in (1, 9, 5):
        cells = torch.randperm(m, generator=g)
        coords = (torch.stack([cells % 3, cells // 3], dim=1) * P).numpy()
        out.append(PatientItem(features=torch.randn(m, 8, generator=g).numpy(), coords=coords,
                               genomics=torch.randn(6, generator=g).numpy(), grade=0, subtype=1,
                               survival_bin=0, survival_months=5.0, censorship=0))
    return out


def umeml(**extra):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=16, n_heads=2, n_prototypes=3, n_registers=1, dropout=0.0, drop_path=0.0, **extra)
    return build_model(cfg, 8, (3, 3), {"grade": 3}).eval()


def test_model_reads_coords_only_with_spatial_context():
    batch = collate(bags(), 8, 6)
    moved = collate(bags(), 8, 6)
    for i, n in enumerate(moved.patch_mask.sum(1).tolist()):  # same cells, other patches on them
        moved.coords[i, :n] = moved.coords[i, :n].roll(1, dims=0)
    spatial, plain = umeml(spatial_context="neighbours", spatial_gate_init=1.0), umeml()
    with torch.no_grad():
        a, b = spatial(*batch.model_inputs()), spatial(*moved.model_inputs())
        assert torch.allclose(a.logits["grade"][0], b.logits["grade"][0])  # one patch: no neighbours
        assert not torch.allclose(a.logits["grade"][1:], b.logits["grade"][1:])
        ref = plain(*batch.model_inputs()).logits["grade"]
        torch.testing.assert_close(plain(*moved.model_inputs()).logits["grade"], ref)
        batch.coords = None
        torch.testing.assert_close(plain(*batch.model_inputs()).logits["grade"], ref)
        with pytest.raises(ValueError, match="needs the patches' coords"):
            spatial(*batch.model_inputs())
        assert spatial.patch_assignments(moved.features, moved.patch_mask, moved.coords).shape == (3, 3, 9)


def test_collate_coords_rules():
    items = bags()
    assert collate(items, 8, 6).coords.shape == (3, 9, 2)
    items[1] = PatientItem(**{**vars(items[1]), "coords": None})
    assert collate(items, 8, 6).coords is None  # never zeros posing as coordinates
    items[1] = PatientItem(**{**vars(items[1]), "coords": np.zeros((3, 2))})
    with pytest.raises(ValueError, match=r"patient 1: coords must be \(9, 2\)"):
        collate(items, 8, 6)


def test_merge_slide_coords_keeps_slides_apart():
    a = np.array([[1000, 0], [1256, 256]])
    b = np.array([[1000, 0], [1256, 0]])
    merged = merge_slide_coords([a, b])
    assert merged.shape == (4, 2)
    np.testing.assert_array_equal(merged[:2], [[0, 0], [256, 256]])
    assert merged[2:, 0].min() - merged[:2, 0].max() == SLIDE_GAP
    nbrs = grid_neighbours(torch.from_numpy(merged).float()[None], torch.ones(1, 4, dtype=torch.bool))
    sets = neighbour_sets(nbrs, 4)[0]
    assert sets == [{1}, {0}, {3}, {2}]


def test_dataset_coords_follow_the_features(tiny_cohort_dir):
    cohort = load_data_dir(tiny_cohort_dir)
    i = next(k for k, p in enumerate(cohort.patients)
             if len(p.slide_ids) == 1 and cohort.bag_patches.get(p.slide_ids[0], 0) > 20)
    (path,) = cohort.bag_files(i)
    coords, feats = read_coords(path).astype(float), read_features(path)
    coords[:, 0] -= coords[:, 0].min()  # merge_slide_coords puts a patient's first slide at x = 0
    row_at = {tuple(xy): row for xy, row in zip(coords, feats)}
    args = (cohort, np.array([i]), np.array([10.0, 20.0, 30.0]))
    item = CohortDataset(*args, max_patches=7, train=True, seed=3, with_coords=True)[0]
    assert item.coords.shape == (7, 2) and item.features.shape == (7, feats.shape[1])
    for xy, row in zip(item.coords, item.features):  # the training subsample keeps rows aligned
        np.testing.assert_array_equal(row_at[tuple(map(float, xy))], row)
    # without a spatial model no coords are read, and the subsample is the same
    plain = CohortDataset(*args, max_patches=7, train=True, seed=3)[0]
    assert plain.coords is None
    np.testing.assert_array_equal(plain.features, item.features)


def write_config(tmp_path, model: dict):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": model}))
    return path


def test_config_errors_name_file_and_key(tmp_path):
    cfg = load_config(write_config(tmp_path, {"spatial_context": "neighbours", "spatial_radius": 2}))
    assert cfg.model.spatial_context == "neighbours" and cfg.model.spatial_radius == 2
    assert load_config(write_config(tmp_path, {})).model.spatial_context == "none"
    cases = [
        ({"spatial_context": "knn"}, r"exp.yaml: model.spatial_context: must be one of"),
        ({"spatial_radius": 0}, r"exp.yaml: model.spatial_radius: must be >= 1"),
        ({"spatial_gate_init": -0.5}, r"exp.yaml: model.spatial_gate_init: must be >= 0"),
        ({"spatial_gate_init": float("inf")}, r"exp.yaml: model.spatial_gate_init: must be finite"),
        ({"spatial_context": "neighbours", "name": "abmil"}, r"exp.yaml: model.spatial_context: .*umeml only"),
        ({"spatial_context": "neighbours", "modalities": ["genomics"]},
         r"exp.yaml: model.spatial_context: .*needs the pathology"),
    ]
    for model, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_config(write_config(tmp_path, model))
    with pytest.raises(ConfigError, match="model.spatial_context"):
        build_model(ModelConfig(name="abmil", spatial_context="neighbours"), 8, (3,), {"grade": 3})


def test_zero_gate_starts_as_plain_umeml_and_its_gradient_flows():
    batch = collate(bags(), 8, 6)
    gated, plain = umeml(spatial_context="neighbours"), umeml()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".spatial." in k for k in missing)  # the same other weights
    spatial = next(m for m in gated.modules() if isinstance(m, SpatialContext))
    assert (spatial.norm.weight == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(gated(*batch.model_inputs()).logits["grade"],
                                   plain(*batch.model_inputs()).logits["grade"])
    gated.train()
    gated(*batch.model_inputs()).logits["grade"].pow(2).sum().backward()
    assert spatial.norm.weight.grad is not None and spatial.norm.weight.grad.abs().sum() > 0
    opened = SpatialContext(4, gate_init=0.7)
    assert torch.allclose(opened.norm.weight, torch.full((4,), 0.7))
