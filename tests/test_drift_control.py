"""Drift control under label skew (issue 13's remaining GBM-LGG gap): SCAFFOLD's control variates
(Karimireddy et al. 2020, option II) and FedLC's logit calibration (Zhang et al. 2022)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message, RecordDict

from umeml.client.app import SimulatedSites, build_client_app
from umeml.config import ConfigError, config_from_dict, config_to_dict
from umeml.data.source import CohortSource
from umeml.federation.label_skew import CalibratedLogits, calibration_offsets
from umeml.federation.scaffold import (
    CONTROL_DELTA,
    SERVER_CONTROL,
    ControlVariateStore,
    correction_term,
    momentum_steps,
    server_control_update,
    updated_control,
)
from umeml.model.blocks import ModelOutput
from umeml.server.coordinator import Coordinator
from umeml.train.losses import task_loss

from fed_helpers import LocalGrid, tiny_experiment

SITES = ("A0", "A1", "A2")
SGD = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01}


# ------------------------------------------------------------------ SCAFFOLD, the formulas
def _least_squares(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g), torch.randn(8, generator=g)


def test_local_steps_and_control_update_follow_option_ii():
    """Plain SGD on a tiny least-squares problem: each step is y - lr (g(y) + c - c_i), and
    c_i+ = c_i - c + (x - y) / (K lr), the paper's option II, computed by hand."""
    X, t = _least_squares(0)
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.2, 0.1]]))
    x = {"weight": model.weight.detach().clone()}
    c = {"weight": torch.tensor([[0.3, -0.1, 0.2]])}
    c_i = {"weight": torch.tensor([[-0.2, 0.4, 0.0]])}
    lr, K = 0.05, 4
    term = correction_term(model, c, c_i)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    y = x["weight"].clone()
    for _ in range(K):
        by_hand = y - lr * (2 * ((X @ y.T).squeeze(1) - t) @ X / len(t) + c["weight"] - c_i["weight"])
        opt.zero_grad()
        loss = ((model(X).squeeze(1) - t) ** 2).mean() + term(model)
        loss.backward()
        opt.step()
        y = model.weight.detach().clone()
        assert torch.allclose(y, by_hand, atol=1e-6)
    new = updated_control(c_i, c, x, {"weight": y}, K, lr)
    assert torch.allclose(new["weight"], c_i["weight"] - c["weight"] + (x["weight"] - y) / (K * lr), atol=1e-6)


def test_momentum_step_count_recovers_a_constant_gradient():
    """Heavy-ball SGD from a zero buffer: with a constant gradient g (a linear loss), option II
    with S = sum (1 - beta^t) / (1 - beta) steps recovers g exactly (c = c_i = 0)."""
    g = torch.tensor([0.7, -1.3, 0.2])
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        (p * g).sum().backward()
        opt.step()
    zero = {"p": torch.zeros(3)}
    est = updated_control(zero, zero, {"p": torch.zeros(3)}, {"p": p.detach()}, 5, 0.1, 0.9)
    assert torch.allclose(est["p"], g, atol=1e-5)
    assert momentum_steps(5, 0.0) == 5.0 and momentum_steps(2, 0.5) == pytest.approx(1.0 + 1.5)
    # no step taken: c_i unchanged
    assert torch.equal(updated_control({"p": g}, zero, zero, zero, 0, 0.1)["p"], g)


def test_server_control_is_the_weighted_mean_delta_times_participation():
    c = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    deltas = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 3.0])}]
    new = server_control_update(c, deltas, [1.0, 3.0], participation=0.5)
    assert np.allclose(new["w"], [1.0 + 0.5 * 0.25, 2.0 + 0.5 * 2.25]) and new["w"].dtype == np.float32
    assert server_control_update(c, [], [], 1.0) is c


def test_site_control_variate_is_kept_per_round_and_a_rerun_starts_from_zero(tmp_path):
    store = ControlVariateStore(tmp_path, "A0", "exp")
    like = {"w": torch.ones(2)}
    assert torch.equal(store.load(1, like)["w"], torch.zeros(2))
    store.save({"w": torch.tensor([1.0, 2.0])}, 1)
    assert torch.equal(store.load(2, like)["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(store.load(1, like)["w"], torch.zeros(2))  # a new run of the experiment
    store.save({"w": torch.tensor([5.0, 5.0])}, 3)
    assert torch.equal(store.load(3, like)["w"], torch.zeros(2))  # a rerun of round 3: from its future
    with pytest.raises(RuntimeError, match="state dir"):
        ControlVariateStore(None, "A0", "exp")


# ------------------------------------------------------------------ SCAFFOLD in a federation
def _scaffold(rounds: int, **fed):
    return tiny_experiment(rounds=rounds, train=SGD, strategy="scaffold", survival_hist_epsilon=None, **fed)


def _run(tiny_cohort_dir, run_dir, cfg, resume=False, tamper=None):
    sites = SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir)), state_root=str(run_dir / "sites"))
    grid = LocalGrid(build_client_app(sites), len(SITES), tamper=tamper)
    final = Coordinator(cfg, run_dir / "run", expected_sites=3, held_out=("A2",), wait_timeout=5, resume=resume,
                        printer=lambda s: None).run(grid)
    return final, grid


@pytest.fixture(scope="module")
def scaffold_run(tiny_cohort_dir, tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("scaffold")
    return (*_run(tiny_cohort_dir, root, _scaffold(3)), root)


def test_control_variates_travel_with_the_weights_and_stay_shaped_like_them(scaffold_run):
    final, grid, root = scaffold_run
    assert final["rounds"] == 3
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(trains) == 6 and len(replies) == 6
    first = {k: a.numpy() for k, a in trains[0].content[SERVER_CONTROL].items()}
    shapes = {k: a.numpy().shape for k, a in trains[0].content["arrays"].items()}
    assert {k: v.shape for k, v in first.items()} == shapes and not any(v.any() for v in first.values())
    later = trains[-1].content[SERVER_CONTROL]
    assert any(np.abs(a.numpy()).sum() > 0 for a in later.values())  # c moved after the first round
    for reply in replies:
        delta = reply.content[CONTROL_DELTA]
        assert {k: a.numpy().shape for k, a in delta.items()} == shapes
    saved = torch.load(root / "run" / "resume.pt", weights_only=True)["strategy"]
    assert "c_global" in saved and set(saved["c_global"]) == set(shapes)
    for site in ("A0", "A1"):  # c_i stays at the site
        assert (root / "sites" / site / "scaffold-experiment.pt").is_file()


def test_resumed_scaffold_run_equals_the_uninterrupted_one(tiny_cohort_dir, tmp_path, scaffold_run):
    _, _, root = scaffold_run
    _run(tiny_cohort_dir, tmp_path, _scaffold(1))
    _run(tiny_cohort_dir, tmp_path, _scaffold(3), resume=True)
    a = torch.load(root / "run" / "resume.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    for k in a["weights"]:
        assert torch.allclose(a["weights"][k], b["weights"][k], atol=1e-6), k
    for k in a["strategy"]["c_global"]:
        assert np.allclose(a["strategy"]["c_global"][k], b["strategy"]["c_global"][k], atol=1e-6), k


def test_a_malformed_control_delta_rejects_the_update(tiny_cohort_dir, tmp_path):
    def nan_delta(reply: Message) -> Message:
        if reply.metadata.message_type != "train" or CONTROL_DELTA not in reply.content.array_records:
            return reply
        delta = reply.content[CONTROL_DELTA]
        bad = {k: Array(np.full(a.numpy().shape, np.nan, dtype=np.float32)) for k, a in delta.items()}
        content = RecordDict({n: r for n, r in reply.content.items() if n != CONTROL_DELTA})
        content[CONTROL_DELTA] = ArrayRecord(bad)
        return Message(metadata=reply.metadata, content=content)

    _run(tiny_cohort_dir, tmp_path, _scaffold(1), tamper={102: nan_delta})
    hist = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["history"]
    rejected = [t for t in hist[0]["train"] if "rejected" in t]
    assert hist[0]["accepted"] == 1 and "scaffold-dc" in rejected[0]["rejected"]


# ------------------------------------------------------------------ config errors
def _raw(**changes):
    raw = config_to_dict(tiny_experiment(train=SGD))
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    return raw


@pytest.mark.parametrize("changes,key", [
    ({"federation": {"strategy": "scaffold", "local_dp": {"enabled": True, "target_epsilon": 8.0}}},
     "federation.strategy"),
    ({"federation": {"strategy": "scaffold"}, "train": {"optimizer": "adamw"}}, "train.optimizer"),
    ({"federation": {"strategy": "scaffold", "optimizer_state": "site"}}, "federation.optimizer_state"),
    ({"federation": {"strategy": "scaffold", "keep_local": ["fusion.*"]}}, "federation.keep_local"),
    ({"federation": {"logit_calibration_tau": 1.0, "local_dp": {"enabled": True, "target_epsilon": 8.0}}},
     "federation.logit_calibration_tau"),
])
def test_drift_controls_refused_where_they_do_not_hold(changes, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_raw(**changes), "exp.yaml")
    assert str(err.value).startswith("exp.yaml: ") and key in str(err.value)


# ------------------------------------------------------------------ FedLC
def test_calibration_offsets_are_minus_tau_over_the_fourth_root_of_the_counts():
    off = calibration_offsets([16, 1, 0], tau=2.0)
    assert torch.allclose(off, torch.tensor([-1.0, -2.0, -2.0]))  # an absent class counts as 1


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.w = torch.nn.Parameter(logits.clone())

    def forward(self, *_):
        return ModelOutput(logits={"grade": self.w, "survival": self.w[:, :2]}, aux_loss=torch.zeros(len(self.w)))


def test_calibrated_loss_is_cross_entropy_of_the_shifted_logits_and_survival_is_untouched():
    logits = torch.tensor([[0.2, -0.4, 1.0], [0.0, 0.3, -0.1]])
    off = calibration_offsets([30, 5, 0], tau=1.0)
    model = CalibratedLogits(_Fixed(logits), {"grade": off})
    out = model()
    assert torch.allclose(out.logits["grade"], logits + off) and torch.equal(out.logits["survival"], logits[:, :2])

    class B:
        grade = torch.tensor([0, 1])

    loss = task_loss(out, B, ["grade"])
    assert torch.allclose(loss, F.cross_entropy(logits + off, B.grade, reduction="none"))
    # the offsets are buffers of the loss, not weights: nothing new would be sent
    assert [n for n, _ in model.named_parameters()] == ["model.w"]


def test_a_site_with_its_own_local_dp_refuses_scaffold(tiny_cohort_dir, tmp_path):
    """The experiment may leave local DP off while a site's own file turns it on: that site does
    not train under SCAFFOLD (its control delta would leave outside the DP guarantee)."""
    from umeml.config import DPConfig
    from umeml.federation.scaffold import ControlExchange

    from fed_helpers import site_runtimes

    cfg = _scaffold(1)
    sites, prep, weights = site_runtimes(tiny_cohort_dir, cfg, sites=("A0",), state_root=tmp_path,
                                         dp=DPConfig(enabled=True, target_epsilon=8.0))
    control = ControlExchange({k: torch.zeros_like(v, dtype=torch.float32) for k, v in weights.items()})
    state, metrics = sites["A0"].train(cfg, prep, weights, 1, control=control)
    assert state is None and "local DP" in metrics["skipped"] and control.delta is None


def test_scaffold_warns_about_the_server_momentum_that_diverged(caplog):
    from umeml.config import FederationConfig
    from umeml.server.strategies import Scaffold, build_strategy

    with caplog.at_level("WARNING", logger="umeml.server.strategies"):
        plain = build_strategy(FederationConfig(strategy="scaffold", server_momentum=0.0))
    assert isinstance(plain, Scaffold) and "diverged" not in caplog.text
    with caplog.at_level("WARNING", logger="umeml.server.strategies"):
        build_strategy(FederationConfig(strategy="scaffold"))  # the default 0.9, FedAvgM's
    assert "diverged" in caplog.text
