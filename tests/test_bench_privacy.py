"""bench/_privacy_recipe.py: each DP row's no-DP twin differs from it in DP only, and "umeml all"
trains everything (it once inherited configs/demo_dp.yaml's ``trainable: heads``, so the
from-scratch rows trained random heads on random encoders and sat at chance)."""

import argparse
import dataclasses
import math

import pytest

from bench import _privacy_recipe as recipe


@pytest.fixture
def world():
    cfg = recipe._roles(recipe._small(recipe._load("demo_dp.yaml")), ("A0", "A1", "A2"), ("A3",))
    return recipe.World("synthetic", None, None, ("A4",), ("A0", "A1", "A2"), ("A3",), cfg, None, None)


def _without_dp(cfg):
    fed = cfg.federation
    fed = dataclasses.replace(fed, local_dp=dataclasses.replace(fed.local_dp, enabled=False, target_epsilon=1.0),
                              dp_recipe=dataclasses.replace(fed.dp_recipe, apply_without_dp=False))
    return dataclasses.replace(cfg, name="", federation=fed)


@pytest.mark.parametrize("variant", recipe.VARIANTS)
def test_no_dp_twin_differs_from_the_dp_row_in_dp_only(world, variant):
    dp = recipe.variant_config(world, variant, 8.0, 1, "public.pt")
    twin = recipe.variant_config(world, variant, math.inf, 1, "public.pt")
    assert dp.federation.local_dp.enabled and dp.federation.local_dp.target_epsilon == 8.0
    assert not twin.federation.local_dp.enabled and twin.federation.dp_recipe.apply_without_dp
    assert _without_dp(dp) == _without_dp(twin)
    assert twin.federation.strategy == dp.federation.strategy == "fedavgm"


def test_rows_train_their_stated_part(world):
    part = {v: recipe.variant_config(world, v, 8.0, 0, "p.pt").train.trainable for v in recipe.VARIANTS}
    assert part == {"umeml all": "all", "linear": "all", "umeml public + heads": "heads",
                    "umeml public + decoder": "decoder", "linear public": "all"}
    init = {v: recipe.variant_config(world, v, 8.0, 0, "p.pt").federation.init_checkpoint for v in recipe.VARIANTS}
    assert init == {"umeml all": None, "linear": None, "umeml public + heads": "p.pt", "umeml public + decoder": "p.pt",
                    "linear public": "p.pt"}
    models = {v: recipe.variant_config(world, v, 8.0, 0, "p.pt").model.name for v in recipe.VARIANTS}
    assert models == {"umeml all": "umeml", "linear": "linear", "umeml public + heads": "umeml",
                      "umeml public + decoder": "umeml", "linear public": "linear"}
    assert recipe.public_of("linear public") == recipe.PUBLIC_LINEAR and recipe.public_of("linear") == recipe.PUBLIC_ALONE
    tuned = recipe.variant_config(world, "umeml public + heads", 4.0, 0, "p.pt",
                                  {"rounds": 20, "lr": 0.1, "trainable": "decoder"})
    assert (tuned.federation.rounds, tuned.federation.dp_recipe.lr, tuned.train.trainable) == (20, 0.1, "decoder")
    assert recipe.variant_config(world, "umeml all", 4.0, 0, "p.pt", {"trainable": "decoder"}).train.trainable == "all"


def test_at_a_small_epsilon_the_releases_leave_room_for_dp_sgd(world):
    # the default releases (histogram 1 + class counts 1.5 + genomic moments 0.5) took a site's whole budget at 1
    small = recipe.variant_config(world, "linear", 1.0, 0, "p.pt").federation
    sp = small.stats_privacy
    assert small.survival_hist_epsilon == sp.class_counts_epsilon == sp.genomic_epsilon == 0.2
    big = recipe.variant_config(world, "linear", 4.0, 0, "p.pt").federation
    assert (big.survival_hist_epsilon, big.stats_privacy.class_counts_epsilon, big.stats_privacy.genomic_epsilon) \
        == (1.0, 1.5, 0.5)


def _row(variant, eps, seed, grade, c_index):
    return {"world": "synthetic", "variant": variant, "epsilon": eps, "seed": seed, "spent": None, "wall_s": 1.0,
            "load": 1.0, "grade_auc_macro": (grade, None, None), "subtype_auc_macro": None,
            "survival_c_index": (c_index, None, None)}


def test_versus_rows_pair_the_same_row_and_seed_of_the_two_grids(world):
    after = [_row("linear", 8.0, s, 0.8 + 0.01 * s, 0.6) for s in (0, 1, 2)] + [_row("linear", math.inf, 0, 0.9, 0.7)]
    before = [_row("linear", 8.0, s, 0.9, 0.4 + 0.1 * s) for s in (0, 1, 3)]  # seed 3 has no partner
    lines = recipe.versus_rows(after, before)
    assert lines == ["| synthetic | linear | 8 | 2 | -0.095 ± 0.007 | - | +0.150 ± 0.071 |"]
    assert recipe.variant_config(world, "linear", 8.0, 0, "p.pt", {"clip_groups": "heads"}) \
        .federation.dp_recipe.clip_groups == "heads"


def test_a_tuning_pass_at_another_epsilon_is_listed_apart_from_the_passes_at_8():
    row = {"world": "synthetic", "variant": "linear", "tune": {}, "load": 1.0,
           "val_grade_auc_macro": 0.8, "val_subtype_auc_macro": 0.7, "val_survival_c_index": 0.6}
    lines = recipe.tune_table([row, {**row, "seed": 1}, {**row, "epsilon": 1.0, "val_grade_auc_macro": 0.5}])
    assert len(lines) == 2 and lines[0].startswith("| synthetic | linear | `{}` | 2 | 0.800 | 0.700 | 0.600 |")
    assert lines[1].startswith("| synthetic (epsilon 1) | linear | `{}` | 1 | 0.500 |")


def test_a_model_override_reaches_the_row_and_its_public_checkpoint(world):
    over = {"survival_head": "proportional", "lr": 0.1}
    cfg = recipe.variant_config(world, "linear public", 8.0, 0, "p.pt", over)
    assert cfg.model.survival_head == "proportional" and cfg.federation.dp_recipe.lr == 0.1
    assert recipe.model_overrides(over) == {"survival_head": "proportional"}  # what the public run trains with
    assert recipe.variant_config(world, "linear public", 8.0, 0, "p.pt").model.survival_head == "bins"


def test_a_comparison_with_an_earlier_setting_writes_its_own_section():
    from bench.bench_privacy import VERSUS_TITLE, versus_title

    shipped = argparse.Namespace(setting="per-head clip groups", before_setting="the recipe as shipped")
    earlier = argparse.Namespace(setting="noise-scaled lr", before_setting="the fixed lr")
    assert versus_title(shipped) == VERSUS_TITLE
    assert versus_title(earlier) != VERSUS_TITLE and "noise-scaled lr vs the fixed lr" in versus_title(earlier)


def test_a_grid_run_without_reference_gets_its_goals_against_the_other_grids():
    # the before grid ran with --no-reference: its goal lines said "not measured"
    after = [_row("linear", 8.0, s, 0.8, 0.6) for s in (0, 1)] + [_row(recipe.REFERENCE, math.inf, s, 0.9, 0.7)
                                                                 for s in (0, 1)]
    before = [_row("linear", 8.0, s, 0.7, 0.6) for s in (0, 1)]
    assert "not measured" in "\n".join(recipe.goal_lines(before, "linear"))
    lines = "\n".join(recipe.goal_lines(recipe.with_shared_rows(before, after), "linear"))
    assert "epsilon 8 minus reference (mean over 2 seeds): -0.200 / -0.100; goal >= -0.03: **not met**" in lines
    assert recipe.with_shared_rows(after, before) == after  # nothing to add, nothing duplicated


def test_the_bench_trains_its_public_checkpoint_as_simulate_does(monkeypatch, tmp_path):
    # the bench once trained its public checkpoints with configs/demo.yaml's train section (AdamW,
    # 8 epochs) while `umeml-server simulate` used configs/demo_dp.yaml's (SGD): two different models
    import umeml.data.cohort
    from umeml.server.public_init import public_training_config

    monkeypatch.setattr(recipe, "synthetic_data", lambda work, public: tmp_path)
    monkeypatch.setattr(umeml.data.cohort, "load_data_dir", lambda data, cfg: None)
    world = recipe.synthetic_world(tmp_path)
    dp = recipe._load("demo_dp.yaml")
    assert world.public_train.train == dataclasses.replace(recipe._small(dp).train, trainable="all")
    assert world.public_train.data == recipe._small(dp).data and world.public_train.model == dp.model
    assert world.public_train.federation.train_sites == world.public == ("A4", "A5", "A6")
    central = public_training_config(dp, ("A4", "A5", "A6"))
    assert central.train == dataclasses.replace(dp.train, trainable="all") and central.name == "demo_dp-public"
    assert dp.train.epochs == 48 and dp.train.optimizer == "adamw"  # chosen on the public validation (docs)


def test_linear_public_takes_a_trainable_override_and_its_rank_reaches_the_public_checkpoint(world):
    over = {"linear_rank": 16, "trainable": "heads"}
    cfg = recipe.variant_config(world, "linear public", 8.0, 0, "p.pt", over)
    assert (cfg.model.name, cfg.model.linear_rank, cfg.train.trainable) == ("linear", 16, "heads")
    assert recipe.model_overrides(over) == {"linear_rank": 16}  # the public linear model is trained with it
    assert recipe.variant_config(world, "linear", 8.0, 0, "p.pt", over).train.trainable == "all"  # from scratch
