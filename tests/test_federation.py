"""Coordinator + ClientApp handlers over an in-process grid: protocol, faults, validation, resume."""

import json
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from umeml.client.app import SimulatedSites, build_client_app
from umeml.data.source import CohortSource
from umeml.data.synth import SynthSpec, generate
from umeml.federation.protocol import HandshakeMismatch
from umeml.server.coordinator import Coordinator, FederationError

from fed_helpers import LocalGrid, tiny_experiment

SITES = ("A0", "A1", "A2")


def experiment(**fed):
    return tiny_experiment(bootstrap=20, **fed)


@pytest.fixture(scope="module")
def app(tiny_cohort_dir):
    return build_client_app(SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir))))


def run(app, tmp_path, cfg=None, grid=None, resume=False, out="run"):
    cfg = cfg or experiment()
    grid = grid or LocalGrid(app, len(SITES))
    coord = Coordinator(cfg, tmp_path / out, expected_sites=len(SITES), held_out=("A2",), resume=resume,
                        wait_timeout=5, printer=lambda s: None)
    return coord.run(grid), grid


def test_rounds_write_run_dir(app, tmp_path, monkeypatch):
    # a round's wall time counts the previous round's checkpoint writes (they used to count nowhere):
    # the checkpoint "takes" 1000 s on a clock the coordinator reads
    import umeml.server.coordinator as coordinator

    clock, save = [0.0], Coordinator._save

    def slow_save(self, state, prep):
        save(self, state, prep)
        clock[0] += 1000.0

    real = coordinator.time.perf_counter
    monkeypatch.setattr(coordinator.time, "perf_counter", lambda: real() + clock[0])
    monkeypatch.setattr(Coordinator, "_save", slow_save)
    final, grid = run(app, tmp_path)
    assert final["seconds_per_round"][0] < 1000 <= final["seconds_per_round"][1]
    assert final["overhead_seconds_per_round"][1] >= 1000
    assert final["rounds"] == 2 and final["held_out_sites"] == ["A2"]
    assert final["training_sites"] == ["A0", "A1"]
    held = final["held_out"]["A2"]
    assert held["n"] == 20 and set(held["tasks"]) == {"grade", "subtype", "survival"}
    assert final["held_out_combined"]["grade"]["auc_macro"]["n"] == 20
    d = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "final.json", "preprocessing.json", "resume.pt", "checkpoints/global.pt"):
        assert (d / name).is_file(), name
    rows = (d / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("round,1,held_out,A2,20,grade,auc_macro,") for r in rows)
    assert any(r.startswith("round,2,train,A0,") for r in rows)
    # held-out sites never train
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert trained == {101, 102}


@pytest.mark.parametrize("strategy,state", [("fedadam", {"m_t", "v_t"}), ("fedavgm", {"momentum_vector"})])
def test_resume_continues_with_nothing_lost(app, tmp_path, strategy, state):
    # two runs agree only with exact survival histograms (the DP noise is unseeded by design)
    exact = {"survival_hist_epsilon": None}
    full, _ = run(app, tmp_path, experiment(rounds=3, strategy=strategy, **exact), out="full")
    run(app, tmp_path, experiment(rounds=1, strategy=strategy, **exact), out="part")
    resumed, grid = run(app, tmp_path, experiment(rounds=3, strategy=strategy, **exact), resume=True, out="part")
    assert resumed["rounds"] == 3
    # no preprocessing query and no round-1 training on resume
    kinds = [m.metadata.message_type for m in grid.sent]
    assert "query.preprocess" not in kinds
    rounds_trained = {m.content["config"]["server-round"] for m in grid.sent if m.metadata.message_type == "train"}
    assert rounds_trained == {2, 3}
    a = torch.load(tmp_path / "full" / "resume.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "resume.pt", weights_only=True)
    for k in a["weights"]:
        assert torch.allclose(a["weights"][k], b["weights"][k], atol=1e-6), k
    assert set(a["strategy"]) == state
    assert [e["round"] for e in b["history"]] == [1, 2, 3]


def test_site_dying_mid_round_does_not_stop_the_run(app, tmp_path):
    grid = LocalGrid(app, len(SITES), drop={102: lambda kind, rnd: rnd == 2})
    final, _ = run(app, tmp_path, grid=grid)
    assert final["rounds"] == 2
    hist = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["history"]
    assert [e["accepted"] for e in hist] == [2, 1]


def test_bad_updates_are_rejected(app, tmp_path):
    grid = LocalGrid(app, len(SITES), tamper={101: lambda r: _replace_content(r, "nan")})
    final, _ = run(app, tmp_path, grid=grid)
    hist = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["history"]
    rejected = [t for e in hist for t in e["train"] if "rejected" in t]
    assert len(rejected) == 2 and "NaN" in rejected[0]["rejected"]
    weights = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["weights"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_update_norm_bound(app, tmp_path):
    grid = LocalGrid(app, len(SITES), tamper={101: lambda r: _replace_content(r, "huge")})
    run(app, tmp_path, experiment(max_update_norm=50.0), grid=grid)
    hist = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["history"]
    reasons = [t["rejected"] for e in hist for t in e["train"] if "rejected" in t]
    assert reasons and all("exceeds federation.max_update_norm" in r for r in reasons)


def _replace_content(reply: Message, how: str) -> Message:
    if reply.metadata.message_type != "train":
        return reply
    arrays = reply.content["arrays"]
    if how == "nan":
        new = {k: Array(np.full_like(v.numpy(), np.nan) if v.numpy().dtype.kind == "f" else v.numpy()) for k, v in arrays.items()}
    else:
        new = {k: Array(v.numpy() * 1000 if v.numpy().dtype.kind == "f" else v.numpy()) for k, v in arrays.items()}
    reply.content["arrays"] = ArrayRecord(new)
    return reply


def test_handshake_mismatch_names_site_and_field(tmp_path, tiny_cohort_dir):
    other = tmp_path / "other"
    generate(SynthSpec(sites=3, patients=20, seed=7, feature_dim=8, median_patches=40, min_patches=4, max_patches=200), other)

    class Mixed:
        def __init__(self):
            self.a = SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir)))
            self.b = SimulatedSites(SITES, CohortSource(data_dir=str(other)))

        def __call__(self, context, cfg):
            return (self.b if context.node_config["partition-id"] == 1 else self.a)(context, cfg)

    with pytest.raises(HandshakeMismatch, match=r"site A1: feature_dim 8 != federation's 16"):
        run(build_client_app(Mixed()), tmp_path)


def test_unknown_held_out_site(app, tmp_path):
    cfg = experiment()
    coord = Coordinator(cfg, tmp_path / "r", expected_sites=3, held_out=("ZZ",), wait_timeout=5, printer=lambda s: None)
    with pytest.raises(FederationError, match="held-out site"):
        coord.run(LocalGrid(app, 3))


def test_fedprox_sends_proximal_term(app, tmp_path):
    _, grid = run(app, tmp_path, experiment(strategy="fedprox", proximal_mu=0.5, rounds=1))
    mus = {m.content["config"]["proximal-mu"] for m in grid.sent if m.metadata.message_type == "train"}
    assert mus == {0.5}


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "fedyogi"])
def test_every_strategy_runs(app, tmp_path, strategy):
    final, _ = run(app, tmp_path, experiment(strategy=strategy, rounds=1))
    assert final["strategy"] == strategy and final["rounds"] == 1


def test_resume_without_held_out_keeps_the_recorded_held_out_sites(app, tmp_path):
    # the held-out site came from a flag, not from the config: a resume that does not repeat the
    # flag used to hold out nothing, and A2 received train messages
    cfg = experiment(rounds=1)
    Coordinator(cfg, tmp_path / "run", expected_sites=3, held_out=("A2",), wait_timeout=5,
                printer=lambda s: None).run(LocalGrid(app, len(SITES)))
    assert json.loads((tmp_path / "run" / "roles.json").read_text()) == {"held_out": ["A2"], "training": ["A0", "A1"]}
    grid = LocalGrid(app, len(SITES))
    final = Coordinator(experiment(rounds=2), tmp_path / "run", expected_sites=3, held_out=(), resume=True,
                        wait_timeout=5, printer=lambda s: None).run(grid)
    assert final["held_out_sites"] == ["A2"] and final["rounds"] == 2
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert trained == {101, 102}
    with pytest.raises(FederationError, match="holds out"):
        Coordinator(experiment(rounds=3), tmp_path / "run", expected_sites=3, held_out=("A1",), resume=True,
                    wait_timeout=5, printer=lambda s: None).run(LocalGrid(app, len(SITES)))


def test_gone_site_gets_no_messages_and_logs_name_its_site(app, tmp_path):
    sent_after = []

    def vanish_after_round_1(reply):  # A1's SuperNode stops its heartbeat after answering round 1
        if reply.metadata.message_type == "train" and 102 in grid.node_ids:
            grid.node_ids.remove(102)
            sent_after.append(len(grid.sent))
        return reply

    grid = LocalGrid(app, len(SITES), tamper={102: vanish_after_round_1})
    final, _ = run(app, tmp_path, experiment(rounds=3), grid=grid)
    assert final["rounds"] == 3
    assert not [m for m in grid.sent[sent_after[0]:] if m.metadata.dst_node_id == 102]
    log = (tmp_path / "run" / "coordinator.log").read_text()
    assert "site A1 (node 102) has gone (no heartbeat): no messages until it rejoins" in log


def test_resume_with_a_training_site_absent_keeps_its_role(app, tmp_path):
    Coordinator(experiment(rounds=1), tmp_path / "run", expected_sites=3, held_out=("A2",), wait_timeout=5,
                printer=lambda s: None).run(LocalGrid(app, len(SITES)))
    grid = LocalGrid(app, len(SITES))
    grid.node_ids.remove(102)  # A1 has not reconnected when the coordinator resumes
    final = Coordinator(experiment(rounds=2), tmp_path / "run", expected_sites=2, resume=True, wait_timeout=5,
                        printer=lambda s: None).run(grid)
    assert final["rounds"] == 2 and final["training_sites"] == ["A0", "A1"]
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"} == {101}
    assert json.loads((tmp_path / "run" / "roles.json").read_text())["training"] == ["A0", "A1"]


def test_a_run_naming_no_held_out_site_holds_out_split_n_test_sites_as_a_simulation_would(app, tmp_path,
                                                                                       tiny_cohort_dir):
    # a deployment used to ignore split.n_test_sites (default 1): every site trained and the
    # held-out table was empty, while the same config simulated held one site out
    from umeml.data.cohort import load_data_dir
    from umeml.server.simulate import plan_sites

    cfg = experiment(rounds=1)
    _, expected = plan_sites(cfg, load_data_dir(tiny_cohort_dir))  # the simulation's rule
    lines, grid = [], LocalGrid(app, len(SITES))
    final = Coordinator(cfg, tmp_path / "run", expected_sites=3, wait_timeout=5, printer=lines.append).run(grid)
    assert len(expected) == 1 and final["held_out_sites"] == list(expected)
    held_node = 101 + SITES.index(expected[0])
    assert held_node not in {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert final["held_out"][expected[0]]["n"] == 20
    assert any(f"held out by split.n_test_sites=1: {expected[0]}" in line for line in lines)
    assert json.loads((tmp_path / "run" / "roles.json").read_text())["held_out"] == list(expected)
    # no site would be left to train: a clear error, before any round
    with pytest.raises(FederationError, match="split.n_test_sites=3: cannot hold out 3 of 3 sites"):
        Coordinator(experiment(rounds=1, split={"n_test_sites": 3}), tmp_path / "r3", expected_sites=3, wait_timeout=5,
                    printer=lambda s: None).run(LocalGrid(app, len(SITES)))
    # split.n_test_sites: 0 holds out nothing; a site without patients is never chosen
    from umeml.server.heldout import held_out_by_rule

    joined = {101: {"site": "A0", "n_patients": 20}, 102: {"site": "A1", "n_patients": 0}}
    assert held_out_by_rule(experiment(split={"n_test_sites": 0}), joined) == ((), "")
    assert held_out_by_rule(experiment(), {**joined, 103: {"site": "A2", "n_patients": 9}})[0] in {("A0",), ("A2",)}



class OrderedGrid(LocalGrid):
    """Replies come back in the messages' order or reversed (on a real SuperLink the site that
    finishes first answers first, and Flower shuffles the nodes it samples); ``returned`` keeps
    the order the coordinator saw."""

    def __init__(self, *args, reverse: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.reverse, self.returned = reverse, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        replies = replies[::-1] if self.reverse else replies
        self.returned.extend(replies)
        return replies


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(tmp_path_factory, tmp_path):
    # four sites, three training: float sums of three or more updates depend on their order
    # (two terms commute), so a coordinator summing in arrival order gave run-to-run differences
    data = tmp_path_factory.mktemp("synth4") / "four"
    generate(SynthSpec(sites=4, patients=12, seed=3, feature_dim=16, median_patches=20, min_patches=4,
                       max_patches=60), data)
    sites = ("A0", "A1", "A2", "A3")
    four = build_client_app(SimulatedSites(sites, CohortSource(data_dir=str(data))))
    weights, orders = [], []
    for name, reverse in (("in_order", False), ("reversed", True)):
        grid = OrderedGrid(four, len(sites), reverse=reverse)
        random.seed(0)  # Flower samples (orders) the training nodes with Python's random: the same order both runs
        Coordinator(experiment(rounds=2), tmp_path / name, expected_sites=len(sites), held_out=("A3",),
                    wait_timeout=5, printer=lambda s: None).run(grid)
        orders.append([m.metadata.src_node_id for m in grid.returned if m.metadata.message_type == "train"])
        weights.append(torch.load(tmp_path / name / "resume.pt", weights_only=True)["weights"])
    assert orders[0][:3] == orders[1][:3][::-1] and len(set(orders[0][:3])) == 3  # the orders really differed
    assert weights[0].keys() == weights[1].keys()
    different = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not different, f"global weights depend on the replies' arrival order: {different[:5]}"
