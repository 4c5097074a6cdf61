"""Federated optimisation (issue 13, items 1-2): the round-level learning-rate schedule, the site's
optimizer state between rounds, model selection on the training sites' validation (k rule,
validation arriving after its weights), and the personalisation wave (metrics only)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from umeml.client.app import SimulatedSites, build_client_app
from umeml.config import FederationConfig
from umeml.data.source import CohortSource
from umeml.federation.personalise import personal_parameters
from umeml.federation.schedule import LR_SCALE_KEY, OptimizerStore, round_lr_factor
from umeml.federation.selection import RoundSelector, validation_score
from umeml.server.coordinator import Coordinator

from fed_helpers import LocalGrid, tiny_experiment

SITES = ("A0", "A1", "A2")


# ------------------------------------------------------------------------- schedule
def test_constant_schedule_is_one_every_round():
    fed = FederationConfig(rounds=5)
    assert [round_lr_factor(fed, r) for r in range(1, 6)] == [1.0] * 5


def test_cosine_schedule_warms_up_then_decays_like_the_centralized_one():
    fed = FederationConfig(rounds=10, lr_schedule="cosine", warmup_rounds=2)
    f = [round_lr_factor(fed, r) for r in range(1, 11)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warm-up, then the full rate in round 3
    assert f[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    assert all(a > b for a, b in zip(f[2:], f[3:]))  # strictly decreasing after the warm-up
    assert 0 < f[-1] < 0.05  # the last round still trains, at a small rate
    with pytest.raises(ValueError):
        round_lr_factor(fed, 0)


def test_optimizer_store_carries_momentum_and_round_one_starts_fresh(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    store = OptimizerStore(tmp_path, "A0", "exp/1")
    store.save(opt, 1)
    fresh = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert not store.load_into(fresh, 1)  # round 1: a new run, nothing carried
    assert store.load_into(fresh, 2)
    buf = fresh.state[next(iter(model.parameters()))]["momentum_buffer"]
    assert torch.equal(buf, opt.state[next(iter(model.parameters()))]["momentum_buffer"])
    assert fresh.param_groups[0]["lr"] == 0.05  # this round's rate, not the saved one
    assert not OptimizerStore(tmp_path, "A0", "exp/1").load_into(fresh, 1)
    with pytest.raises(RuntimeError, match="state dir"):
        OptimizerStore(None, "A0", "exp")


# ------------------------------------------------------------------------ selection
def _report(n: int, auc: float, suppressed: bool = False) -> dict:
    if suppressed:
        return {"site": "x", "part": "val", "n": n, "suppressed": True}
    return {"site": "x", "part": "val", "n": n, "loss": 1.0 - auc,
            "tasks": {"grade": {"auc_macro": {"value": auc, "n": n}}}}


def _weights(v: float) -> dict:
    return {"w": torch.full((2,), float(v))}


def test_selection_picks_the_best_validated_round_with_the_k_rule():
    sel = RoundSelector("best_validation", k_min=10)
    for rnd in (1, 2, 3, 4):
        sel.offer(rnd, _weights(rnd))
    # a site that reported metrics counts; the other (below k) only its count
    assert sel.observe(1, {"A": _report(12, 0.70), "B": _report(4, 0.0, suppressed=True)})["n"] == 12
    # round 2 looks best, but only suppressed sites validated it: not eligible
    assert sel.observe(2, {"A": _report(6, 0.99, suppressed=True), "B": _report(4, 0.99, suppressed=True)}) is None
    # n-weighted combination over sites: (12 * 0.8 + 20 * 0.9) / 32
    score = sel.observe(3, {"A": _report(12, 0.80), "C": _report(20, 0.90)})
    assert score["score"] == pytest.approx((12 * 0.8 + 20 * 0.9) / 32) and score["sites"] == 2
    sel.observe(4, {"A": _report(12, 0.60), "C": _report(20, 0.60)})
    rnd, weights, record = sel.result(4, _weights(4))
    assert rnd == 3 and torch.equal(weights["w"], _weights(3)["w"])
    assert record["rule"] == "best_validation" and record["round"] == 3 and record["n_validation"] == 32
    assert not sel.pending  # candidates are dropped once validated


def test_selection_with_validation_arriving_one_round_later_keeps_the_right_weights():
    sel = RoundSelector("best_validation", k_min=5)
    sel.offer(1, _weights(1))
    sel.offer(2, _weights(2))  # round 2's weights exist before round 1's validation arrives
    sel.observe(1, {"A": _report(10, 0.9)})
    sel.offer(3, _weights(3))
    sel.observe(2, {"A": _report(10, 0.5)})
    rnd, weights, _ = sel.result(3, _weights(3))  # round 3 never validated (the run ended)
    assert rnd == 1 and torch.equal(weights["w"], _weights(1)["w"])
    restored = RoundSelector("best_validation", k_min=5)
    restored.restore(sel.state())
    assert restored.best_round == 1 and torch.equal(restored.best_weights["w"], _weights(1)["w"])


def test_selection_falls_back_to_the_last_round_and_says_why():
    sel = RoundSelector("best_validation", k_min=10)
    sel.offer(1, _weights(1))
    sel.observe(1, {"A": _report(4, 0.9, suppressed=True)})
    rnd, _, record = sel.result(2, _weights(2))
    assert rnd == 2 and "k=10" in record["note"]
    assert RoundSelector("last", 10).result(5, _weights(5))[2] == {
        "rule": "last", "k_min_patients": 10, "last_round": 5, "round": 5, "note": "rule 'last'"}
    assert validation_score({}, 1) is None


# ------------------------------------------------------------------ a whole federation
@pytest.fixture(scope="module")
def fedopt_run(tiny_cohort_dir, tmp_path_factory, one_torch_thread):
    """Two training sites, one held out, k = 3 with 5 validation patients per site: cosine
    schedule, optimizer state at the sites, best-round selection, personalisation."""
    run_dir = tmp_path_factory.mktemp("fedopt") / "run"
    cfg = tiny_experiment(rounds=3, k_min_patients=3, split={"val_fraction": 0.25}, train={"optimizer": "sgd"},
                          lr_schedule="cosine", warmup_rounds=1, optimizer_state="site",
                          selection="best_validation", personalise_epochs=2, evaluate_every=3)
    sites = SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir)), state_root=str(run_dir / "sites"))
    grid = LocalGrid(build_client_app(sites), len(SITES))
    final = Coordinator(cfg, run_dir, expected_sites=3, held_out=("A2",), wait_timeout=5,
                        printer=lambda s: None).run(grid)
    return cfg, final, grid, run_dir


def test_round_config_carries_the_schedule_and_sites_keep_their_optimizer(fedopt_run):
    cfg, _, grid, run_dir = fedopt_run
    scales = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            conf = m.content["config"]
            scales.setdefault(int(conf["server-round"]), set()).add(float(conf[LR_SCALE_KEY]))
    assert sorted(scales) == [1, 2, 3]
    for r, values in scales.items():  # the same factor to every site, the schedule's
        assert len(values) == 1 and values.pop() == pytest.approx(round_lr_factor(cfg.federation, r))
    saved = torch.load(run_dir / "sites" / "A0" / f"optimizer-{cfg.name}.pt", weights_only=True)
    assert saved["round"] == 3 and saved["optimizer"]["state"]  # momentum buffers kept at the site


def test_selected_round_and_personalisation_are_recorded(fedopt_run):
    _, final, grid, run_dir = fedopt_run
    sel = final["selection"]
    assert sel["rule"] == "best_validation" and 1 <= sel["round"] <= 3 and sel["rounds_scored"] == 3
    hist = torch.load(run_dir / "resume.pt", weights_only=True)["history"]
    scores = {e["round"]: e["evaluation"]["selection_score"]["score"] for e in hist}
    assert sel["round"] == max(scores, key=lambda r: (scores[r], -r))
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    if sel["round"] != 3:  # the held-out metrics are the selected round's
        assert final["held_out"] == sel["evaluation"]["held_out"]
    pers = final["personalisation"]
    assert set(pers["sites"]) == {"A0", "A1"} and pers["n_sites"] == 2 and pers["epochs"] == 2
    assert set(pers["personalised_minus_global"]) >= {"grade auc_macro"}
    with open(run_dir / "metrics.csv") as f:
        kinds = {(r["unit"], r["kind"]) for r in csv.DictReader(f)}
    assert {("personalisation", "personal_global"), ("personalisation", "personal_tuned"),
            ("personalisation", "personal_tuned_combined")} <= kinds


def test_personalisation_sends_no_weights_back(fedopt_run):
    _, _, grid, _ = fedopt_run
    sent = [m for m in grid.sent if m.metadata.message_type == "query.personalise"]
    replies = [m for m in grid.received if m.metadata.message_type == "query.personalise"]
    assert len(sent) == len(replies) == 2 and all("arrays" in m.content.array_records for m in sent)
    for m in replies:
        assert not m.content.array_records and set(m.content.keys()) == {"report"}
        report = json.loads(str(m.content["report"]["json"]))
        assert set(report) == {"site", "n", "n_train", "epochs", "heads", "guard", "global", "personalised", "seconds"}
        assert set(report["guard"]) == {"inner_train", "inner_val", "notes"}  # counts and reasons, no values


def test_personal_parameters_are_the_heads(tiny_cohort_dir):
    from umeml.model import build_model

    model = build_model(tiny_experiment().model, 16, (4, 4), {"grade": 3})
    names = personal_parameters(model)
    assert names and all(n.startswith("heads.") for n in names)
    assert len(names) < len(list(model.parameters()))
    assert np.isfinite(sum(float(p.detach().sum()) for n, p in model.named_parameters() if n in names))


def test_fedadam_takes_the_configured_tau_and_eta():
    from umeml.server.strategies import build_strategy

    tuned = build_strategy(FederationConfig(strategy="fedadam", server_lr=0.003, server_tau=0.01))
    assert tuned.eta == 0.003 and tuned.tau == 0.01
    assert build_strategy(FederationConfig(strategy="fedadam")).tau == 1e-3  # Flower 1.42's default


def test_a_local_dp_site_does_not_personalise(tiny_cohort_dir):
    from umeml.config import DPConfig
    from umeml.federation.personalise import personalise
    from umeml.federation.site import SiteRuntime

    cfg = tiny_experiment(k_min_patients=3, split={"val_fraction": 0.25})
    cohort = CohortSource(data_dir=str(tiny_cohort_dir)).load(cfg.data)
    site = SiteRuntime("A0", cohort, cohort.site_indices("A0"), k_min=3, dp=DPConfig(enabled=True))
    report = personalise(site, cfg, None, {}, 1)  # refused before any weight or preprocessing is used
    assert set(report) == {"site", "n", "n_train", "skipped"} and "local DP" in report["skipped"]
