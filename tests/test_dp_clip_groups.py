"""Per-head clip groups of DP-SGD (``federation.dp_recipe.clip_groups: heads``).

Each task head and the rest of the trainable model are clipped to ``C / sqrt(K)``: a patient's
clipped gradient keeps the joint clipping's sensitivity bound ``C``, the noise keeps Opacus's
standard deviation ``sigma C`` on every coordinate, so the accountant's epsilon is unchanged.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats
from test_dp_fused import CPU, GROUPS, LOSS, D, items, make_model, variance_bounds

from umeml.config import DPConfig, config_from_dict, load_config
from umeml.data.batch import collate
from umeml.errors import ConfigError
from umeml.train.dp import DPSGD, clip_group_labels
from umeml.train.dp_optimizer import FusedDPOptimizer, group_clip_norms
from umeml.train.loop import LossSettings

from fed_helpers import site_runtimes, tiny_experiment

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


def _step(model, batch, clip: float, *, groups: str = "heads", noise: float = 0.0, ebs: float = 1.0,
          seed: int = 0, fused: bool = True, loss: LossSettings = LOSS):
    """The privatised gradient of one DP-SGD step ({name: tensor}) and the clip factors."""
    model = copy.deepcopy(model)
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.0), noise, clip, ebs,
               generator=torch.Generator().manual_seed(seed), secure_mode=False, fused=fused, clip_groups=groups)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    try:
        dp.step(batch, loss, CPU, lambda params: out.update({names[id(p)]: p.grad.detach().clone() for p in params}))
        factors = dp.optimizer.last_clip_factors
    finally:
        dp.close()
    return out, factors


def _group_norms(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each clip group of a {name: gradient} dict."""
    labels = {n: ("head:" + n.split(".")[2] if n.startswith("heads.heads.") else "trunk") for n in grads}
    sq: dict[str, float] = {}
    for n, g in grads.items():
        sq[labels[n]] = sq.get(labels[n], 0.0) + float((g.double() ** 2).sum())
    return {k: math.sqrt(v) for k, v in sq.items()}


def test_group_labels_follow_the_task_heads():
    model = make_model("umeml")
    params = list(model.parameters())
    labels = clip_group_labels(model, params, "heads")
    names = [n for n, _ in model.named_parameters()]
    assert set(labels) == {"trunk", "head:grade", "head:survival"}
    assert labels == [f"head:{n.split('.')[2]}" if n.startswith("heads.heads.") else "trunk" for n in names]
    assert clip_group_labels(model, params, "joint") is None
    with pytest.raises(ValueError, match=r"clip_groups: 'tasks' is not one of \['joint', 'heads'\]"):
        clip_group_labels(model, params, "tasks")
    assert group_clip_norms(1.0, 4) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["umeml", "linear"])
def test_each_patients_clipped_gradient_keeps_the_sensitivity_bound(name):
    """Batches of one: every group within C / sqrt(K), the whole within C; a tiny C clips every
    group with a gradient to exactly C / sqrt(K), so the bound sqrt(K C_k^2) = C is attained when
    every group has one (the linear model's trunk, its missing tokens, only for a missing modality)."""
    model = make_model(name)
    attained = 0
    for clip in (1e-4, 0.05, 1.0):
        for it in items(6, seed=2):
            grads, factors = _step(model, collate([it], D, sum(GROUPS)), clip)
            norms = _group_norms(grads)
            k = len(norms)
            assert factors.shape == (1, k) and k == 3  # trunk, grade, survival
            assert all(v <= clip / math.sqrt(k) * (1 + 1e-5) for v in norms.values()), norms
            total = math.sqrt(sum(v * v for v in norms.values()))
            assert total <= clip * (1 + 1e-5)
            if clip == 1e-4:
                assert all(v == 0 or v == pytest.approx(clip / math.sqrt(k), rel=1e-3) for v in norms.values())
                attained += total == pytest.approx(clip, rel=1e-3)
    assert attained >= 1


def test_grouped_sum_is_the_sum_of_each_patients_grouped_clip():
    """A batch's clipped sum equals the sum over its patients of each one's own grouped clip, and
    differs from the joint clip (the groups are not a relabelling of joint clipping)."""
    model = make_model("umeml")
    batch_items = items(7, seed=3)
    clip = 0.05
    together, _ = _step(model, collate(batch_items, D, sum(GROUPS)), clip, ebs=1.0)
    alone = [_step(model, collate([it], D, sum(GROUPS)), clip, ebs=1.0)[0] for it in batch_items]
    joint, _ = _step(model, collate(batch_items, D, sum(GROUPS)), clip, groups="joint", ebs=1.0)
    for n, g in together.items():
        torch.testing.assert_close(g, sum(a[n] for a in alone), atol=1e-6, rtol=1e-5)
    assert not all(torch.allclose(together[n], joint[n], atol=1e-6) for n in together)


def test_a_small_head_gets_its_own_share_of_the_norm():
    """The mechanism fixed: under joint clipping a head whose gradient is small next to another
    head's gets only its share of C; with clip groups it gets C / sqrt(K) whatever the others do."""
    model = make_model("linear")
    loud = LossSettings(("grade", "survival"), {"grade": torch.full((3,), 100.0)})  # grade's gradient x100
    batch = collate(items(1, seed=5), D, sum(GROUPS))
    clip = 1e-3
    joint, _ = _step(model, batch, clip, groups="joint", loss=loud)
    grouped, _ = _step(model, batch, clip, loss=loud)
    surv = {k: v for k, v in _group_norms(grouped).items() if k == "head:survival"}["head:survival"]
    surv_joint = _group_norms(joint)["head:survival"]
    assert surv == pytest.approx(clip / math.sqrt(3), rel=1e-3)
    assert surv_joint < 0.1 * surv


@pytest.mark.parametrize("groups", ["joint", "heads"])
def test_noise_std_is_sigma_times_the_total_norm_with_or_without_groups(groups):
    """Empty batches: the privatised gradient is pure noise; per coordinate N(0, (sigma C)^2)
    (the expected batch size is 1), the same with clip groups as without."""
    sigma, clip, steps = 2.0, 0.5, 12
    empty = collate([], D, sum(GROUPS))
    draws = []
    for s in range(steps):
        grads, _ = _step(make_model("umeml"), empty, clip, groups=groups, noise=sigma, seed=11 + s)
        draws.append(torch.cat([g.reshape(-1) for g in grads.values()]).double().numpy() / (sigma * clip))
    x = np.stack(draws)
    lo, hi = variance_bounds(x.size)
    var = float((x ** 2).mean())
    assert lo < var < hi, (groups, var, lo, hi)
    assert abs(stats.kurtosis(x.reshape(-1))) < 5 * np.sqrt(24 / x.size)


def test_groups_need_the_fused_optimizer_and_match_the_parameters():
    model = make_model("linear")
    with pytest.raises(ValueError, match="needs the fused DP optimizer"):
        DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.0), 1.0, 1.0, 4.0, fused=False, clip_groups="heads")
    with pytest.raises(ValueError, match=r"clip_groups: 1 labels for \d+ parameters"):
        FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=4.0, clip_groups=["trunk"])


def test_config_key_is_checked_with_file_and_key(tmp_path):
    assert config_from_dict({}).federation.dp_recipe.clip_groups == "joint"
    assert config_from_dict({"federation": {"dp_recipe": {"clip_groups": "heads"}}}).federation.dp_recipe.clip_groups \
        == "heads"
    path = tmp_path / "exp.yaml"
    path.write_text("federation:\n  dp_recipe:\n    clip_groups: tasks\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml.*federation\.dp_recipe\.clip_groups"):
        load_config(path)


def test_site_trains_with_the_recipes_clip_groups_and_records_them(tiny_cohort_dir, tmp_path):
    weights = {}
    for groups in ("joint", "heads"):
        cfg = tiny_experiment(name=f"groups-{groups}", rounds=2, dp_recipe={"clip_groups": groups})
        sites, prep, start = site_runtimes(tiny_cohort_dir, cfg, dp=DPConfig(enabled=True, target_epsilon=8.0),
                                           state_root=tmp_path / groups, dp_seed=7)
        new, metrics = sites["A0"].train(cfg, prep, start, server_round=1)
        assert metrics["privacy"]["clip_groups"] == groups and metrics["steps"] == 2
        weights[groups] = new
    # the same seeded batches and noise: only the clipping differs
    assert any(not torch.equal(weights["joint"][k], weights["heads"][k]) for k in weights["joint"])
