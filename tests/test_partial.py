"""Issue 17: named trainable parts, partial updates, keep-local weights, starting from a
checkpoint, and the DP recipe's schedule (including the steps-per-epoch rounding fix)."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from umeml.client.keep_local import remember_local_copies, with_local_copies
from umeml.config import DPConfig, config_from_dict
from umeml.data.cohort import load_data_dir
from umeml.federation.partial import outgoing_update, sent_keys
from umeml.federation.site import dp_schedule, dp_train_settings, steps_per_epoch
from umeml.model import build_model, save_checkpoint
from umeml.model.io import init_from_checkpoint
from umeml.model.parts import CheckpointMismatch, PartError, apply_trainable, update_keys
from umeml.server.partial import complete_replies, expected_subset, merge_aggregate

from fed_helpers import site_runtimes, tiny_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HEADS = {"grade": 3, "subtype": 3, "survival": 4}


def _model(name="umeml", hidden=16, groups=(4, 4)):
    cfg = tiny_experiment(model={"name": name, "hidden_dim": hidden}).model
    torch.manual_seed(0)
    return build_model(cfg, 16, groups, HEADS)


def _sites(data_dir, cfg, dp=None, state=None):
    return site_runtimes(data_dir, cfg, dp=dp, state_root=state, dp_seed=7)


# ------------------------------------------------------------------ named parts
def test_presets_and_module_lists_freeze_the_rest():
    model = _model()
    heads = apply_trainable(model, "heads")
    assert heads and all(n.startswith("heads.") for n in heads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("heads."))
    decoder = apply_trainable(model, "decoder")
    assert {n.split(".")[0] for n in decoder} == {"decoder", "norm", "fusion", "heads"}
    assert set(apply_trainable(model, ("fusion",))) == {n for n, _ in model.named_parameters() if n.startswith("fusion.")}
    assert len(apply_trainable(model, "all")) == len(list(model.parameters()))


def test_unknown_part_or_unmatched_keep_local_pattern_is_refused():
    model = _model()
    with pytest.raises(PartError, match=r"no module\(s\) \['encoder'\].*top-level modules: path"):
        apply_trainable(model, ("encoder",))
    with pytest.raises(PartError, match=r"keep_local: pattern\(s\) \['bn\.\*'\] match no weight"):
        update_keys(model, "all", ("bn.*",))
    with pytest.raises(PartError, match="no weight to send back"):
        update_keys(model, "heads", ("heads.*",))
    linear = _model("linear")
    assert apply_trainable(linear, "decoder") == apply_trainable(linear, "heads")  # the parts it has
    assert [k.split(".")[0] for k in update_keys(linear, "heads")] == ["heads"] * 6


def test_frozen_parameter_unchanged_after_dp_training_and_absent_from_the_update(tiny_cohort_dir, tmp_path):
    cfg = tiny_experiment(name="frozen", train={"trainable": "heads"})
    dp = DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=50)
    sites, prep, weights = _sites(tiny_cohort_dir, cfg, dp, tmp_path)
    new, metrics = sites["A0"].train(cfg, prep, weights, server_round=1)
    assert metrics["privacy"]["steps"] > 0
    for k, v in new.items():
        moved = not torch.equal(v, weights[k])
        assert moved == k.startswith("heads."), k  # frozen: bit for bit; heads: trained (and noised)
    sent = outgoing_update(new, cfg, prep)
    assert sent and all(k.startswith("heads.") for k in sent)


def test_screening_and_merging_take_exactly_the_sent_subset():
    from flwr.app import ConfigRecord, Message, Metadata

    from umeml.flower.records import arrays_from_state
    from umeml.server.strategies import screen_update

    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = tuple(update_keys(model, "heads"))
    arrays = arrays_from_state(state)

    def reply(sent):
        meta = Metadata(run_id=1, message_id="", src_node_id=5, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
        return Message(metadata=meta, content=RecordDict({"arrays": arrays_from_state(sent), "report": ConfigRecord({})}))

    trained = {k: v + 1.0 for k, v in state.items()}
    good = reply({k: trained[k] for k in keys})
    assert screen_update(good, expected_subset(arrays, keys), None) is None
    assert "unexpected ['decoder" in screen_update(reply(trained), expected_subset(arrays, keys), None)
    assert "missing" in screen_update(reply({k: trained[k] for k in keys[1:]}), expected_subset(arrays, keys), None)
    (full,) = complete_replies([good], arrays)
    assert list(full.content["arrays"].keys()) == list(state)
    assert len(good.content["arrays"]) == len(keys)  # the received reply is left as it came
    merged = merge_aggregate(state, {k: v + 2.0 for k, v in state.items()}, keys)
    assert all(torch.equal(merged[k], state[k] + 2.0 if k in keys else state[k]) for k in state)


def test_keep_local_copy_carries_over_rounds_in_the_node_context(tiny_cohort_dir):
    cfg = tiny_experiment(keep_local=["heads.heads.grade.*"])
    _, prep, weights = _sites(tiny_cohort_dir, cfg)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert with_local_copies(ctx, weights, cfg, prep) is weights  # nothing kept yet: the global values
    own = {k: v + 3.0 for k, v in weights.items()}
    remember_local_copies(ctx, own, cfg, prep)
    assert isinstance(ctx.state.array_records["umeml-keep-local"], ArrayRecord)
    back = with_local_copies(ctx, weights, cfg, prep)
    for k in weights:
        assert torch.equal(back[k], own[k] if k.startswith("heads.heads.grade.") else weights[k])
    assert not any(k.startswith("heads.heads.grade.") for k in sent_keys(cfg, prep))


# ------------------------------------------------------------------ init checkpoint
def test_init_checkpoint_loads_or_names_every_mismatching_tensor(tmp_path):
    src = _model(hidden=16)
    path = save_checkpoint(tmp_path / "public.pt", src)
    same = _model(hidden=16)
    torch.nn.init.zeros_(same.heads.heads["grade"].weight)
    init_from_checkpoint(same, path)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), src.state_dict().values()))
    with pytest.raises(CheckpointMismatch) as err:
        init_from_checkpoint(_model(hidden=32), path)
    text = str(err.value)
    assert "public.pt" in text and "shape differs" in text and "checkpoint (16,), model (32,)" in text
    wanted = r"(?s)missing from the checkpoint: \d+ tensor\(s\): path.proj.0.weight.*more\).*'linear', configured 'umeml'"
    with pytest.raises(CheckpointMismatch, match=wanted):
        init_from_checkpoint(_model(), save_checkpoint(tmp_path / "linear.pt", _model("linear")))
    with pytest.raises(CheckpointMismatch, match="no such checkpoint file"):
        init_from_checkpoint(_model(), tmp_path / "absent.pt")


def test_umeml_train_starts_from_the_init_checkpoint(tiny_cohort_dir, tmp_path):
    from umeml.train.central import train_central

    cfg = tiny_experiment(name="init", epochs=1, train={"trainable": "heads"})
    cohort = load_data_dir(str(tiny_cohort_dir), cfg.data)
    first = train_central(cfg, cohort, tmp_path / "public", progress=False)
    assert first["best_epoch"] >= 0
    public = tmp_path / "public" / "checkpoints" / "best.pt"
    from umeml.model import load

    before, _ = load(public)
    cfg2 = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, init_checkpoint=str(public)))
    train_central(cfg2, cohort, tmp_path / "private", progress=False)
    after, _ = load(tmp_path / "private" / "checkpoints" / "best.pt")
    for (k, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b) or k.startswith("heads."), k  # frozen weights are the public ones


# ------------------------------------------------------------------ DP recipe
def test_steps_per_epoch_rounds_to_nearest_not_down():
    # int(1/q) gave 47 patients at batch 24 one step per epoch and 49 patients two
    assert steps_per_epoch(24 / 47) == steps_per_epoch(24 / 49) == 2
    off = tiny_experiment(batch_size=24, local_epochs=3, dp_recipe={"enabled": False})
    assert dp_schedule(off, 47, 10)[1:] == dp_schedule(off, 49, 10)[1:] == (2, 6)
    assert [steps_per_epoch(q) for q in (1.0, 0.5, 0.4, 0.3, 0.01)] == [1, 2, 2, 3, 100]


def test_recipe_schedule_and_optimizer():
    cfg = tiny_experiment(batch_size=8, local_epochs=5)
    q, spe, planned = dp_schedule(cfg, 40, 10)
    assert (q, spe, planned) == (0.5, 2, 2)  # half the site per batch, 2 steps per round
    assert dp_schedule(cfg, 12, 10)[0] == pytest.approx(8 / 12)  # at least train.batch_size
    assert dp_schedule(cfg, 6, 10)[0] == 1.0
    assert dp_schedule(cfg, 40, 1)[2] == 2
    opt = dp_train_settings(cfg)
    assert (opt.optimizer, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 0.05, 0.0, 0.0)
    assert dp_train_settings(tiny_experiment(dp_recipe={"enabled": False})).optimizer == "adamw"


def test_recipe_picks_server_momentum_unless_the_config_says_otherwise():
    dp = {"local_dp": {"enabled": True}}
    assert config_from_dict({"federation": dp}).federation.strategy == "fedavgm"
    assert config_from_dict({"federation": {**dp, "strategy": "fedprox"}}).federation.strategy == "fedprox"
    assert config_from_dict({"federation": {**dp, "dp_recipe": {"enabled": False}}}).federation.strategy == "fedavg"
    assert config_from_dict({}).federation.strategy == "fedavg"


def test_recipe_ledger_counts_cumulative_steps(tiny_cohort_dir, tmp_path):
    cfg = tiny_experiment(name="cum", rounds=3)
    sites, prep, weights = _sites(tiny_cohort_dir, cfg, DPConfig(enabled=True, target_epsilon=8.0), tmp_path)
    entries = [sites["A0"].train(cfg, prep, weights, server_round=r)[1]["privacy"] for r in (1, 2)]
    assert [e["steps"] for e in entries] == [2, 2]
    assert [e["cumulative_steps"] for e in entries] == [2, 4]
    assert entries[0]["sample_rate"] == pytest.approx(max(8, 0.5 * 16) / 16)
    assert np.isfinite(entries[1]["epsilon"]) and entries[1]["epsilon"] <= 8.0


def test_recipe_twin_without_dp_is_dp_sgd_minus_clipping_and_noise(tiny_cohort_dir):
    """dp_recipe.apply_without_dp trains like DP-SGD with the same Poisson batches and gradient
    scale: with clipping out of reach and zero noise, Opacus's DP-SGD gives the same weights."""
    from umeml.federation.site import dp_schedule as schedule
    from umeml.train.dp import train_dp_steps, train_poisson_steps
    from umeml.train.experiment import loss_settings, make_dataset
    from umeml.train.loop import make_optimizer

    cfg = tiny_experiment(name="twin", dp_recipe={"apply_without_dp": True, "lr": 0.2})
    sites, prep, weights = _sites(tiny_cohort_dir, cfg)
    site = sites["A0"]
    train_idx, _ = site._split(cfg)
    q, spe, planned = schedule(cfg, len(train_idx), 1000)
    out = {}
    for name, fn, kw in (("plain", train_poisson_steps, {}),
                         ("dp", train_dp_steps, {"noise_multiplier": 1e-12, "max_grad_norm": 1e6})):
        model = site.build_model(cfg, prep)
        model.load_state_dict(weights)
        ds = make_dataset(cfg, site.cohort, train_idx, prep, train=True)
        stats = fn(model, ds, make_optimizer(model, dp_train_settings(cfg)), loss_settings(cfg, prep),
                   torch.device("cpu"), sample_rate=q, steps=planned, steps_per_epoch=spe, seed=3, **kw)
        out[name] = (model.state_dict(), stats)
    assert out["plain"][1]["batch_sizes"] == out["dp"][1]["batch_sizes"]
    moved = [k for k in weights if not torch.equal(out["plain"][0][k], weights[k])]
    assert moved
    for k in weights:
        torch.testing.assert_close(out["plain"][0][k], out["dp"][0][k], rtol=1e-4, atol=1e-6)


def test_recipe_twin_trains_the_recipe_schedule_without_a_ledger(tiny_cohort_dir, tmp_path):
    cfg = tiny_experiment(name="twin", local_epochs=1, dp_recipe={"apply_without_dp": True, "local_steps": 5})
    sites, prep, weights = _sites(tiny_cohort_dir, cfg, state=tmp_path)
    ledger = tmp_path / "A0" / "privacy.json"
    before = ledger.read_text() if ledger.is_file() else None  # the survival histogram's release, if any
    new, metrics = sites["A0"].train(cfg, prep, weights, server_round=1)
    # the recipe's 5 Poisson steps (2.5 epochs of expected batch 8 of 16), not one epoch of 2 batches
    assert metrics["steps"] == 5 and "privacy" not in metrics
    assert (ledger.read_text() if ledger.is_file() else None) == before  # nothing privatised, nothing recorded
    off = tiny_experiment(name="twin", local_epochs=1)  # without apply_without_dp: the configured epoch
    assert sites["A0"].train(off, prep, weights, server_round=1)[1]["steps"] == 2
