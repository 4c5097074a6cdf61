"""Central DP through Flower's fixed-clipping wrappers, driven by the coordinator's round loop,
with an RDP epsilon per round in the run's privacy ledger."""

import json
import warnings

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping
from opacus.accountants import RDPAccountant

from umeml.client.app import SimulatedSites, build_client_app
from umeml.data.source import CohortSource
from umeml.errors import ConfigError
from umeml.server.coordinator import Coordinator
from umeml.server.strategies import build_strategy, with_central_dp

from fed_helpers import LocalGrid, tiny_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SITES = ("A0", "A1", "A2")




def experiment(**fed):
    return tiny_experiment(**{"evaluate_every": 2, **fed})


@pytest.fixture(scope="module")
def app(tiny_cohort_dir):
    return build_client_app(SimulatedSites(SITES, CohortSource(data_dir=str(tiny_cohort_dir))))


def run(app, tmp_path, cfg, **grid_kw):
    grid = LocalGrid(app, len(SITES), **grid_kw)
    coord = Coordinator(cfg, tmp_path / "run", expected_sites=len(SITES), held_out=("A2",), wait_timeout=5,
                        printer=lambda s: None)
    return coord.run(grid), grid


def rdp_epsilon(noise, sample_rate, rounds, delta):
    acc = RDPAccountant()
    acc.history = [(noise, sample_rate, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta)


def test_wrapper_selected_by_config():
    fed = experiment(central_dp={"enabled": True, "noise_multiplier": 0.8, "clipping_norm": 2.0}).federation
    s = with_central_dp(build_strategy(fed), fed, 3)
    assert isinstance(s, DifferentialPrivacyServerSideFixedClipping)
    assert (s.noise_multiplier, s.clipping_norm, s.num_sampled_clients) == (0.8, 2.0, 3)
    fed = experiment(strategy="fedprox", central_dp={"enabled": True, "clipping": "client"}).federation
    assert isinstance(with_central_dp(build_strategy(fed), fed, 2), DifferentialPrivacyClientSideFixedClipping)
    assert not hasattr(with_central_dp(build_strategy(experiment().federation), experiment().federation, 2),
                       "noise_multiplier")
    with pytest.raises(ConfigError, match="central_dp: needs strategy fedavg or fedavgm or fedprox"):
        experiment(strategy="krum", central_dp={"enabled": True})


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_central_noise_has_the_wrappers_std_and_does_not_come_from_numpys_global_generator(clipping):
    # Flower's wrappers drew np.random.normal, which umeml-server simulate seeds with the config's
    # seed when it trains a public checkpoint first: the same seed gave the same noise
    from flwr.app import Array, ArrayRecord

    fed = experiment(central_dp={"enabled": True, "noise_multiplier": 0.8, "clipping_norm": 2.0,
                                 "clipping": clipping}).federation
    s = with_central_dp(build_strategy(fed), fed, 4)
    zeros = ArrayRecord({"w": Array(np.zeros((200, 500), np.float32)), "b": Array(np.zeros(7, np.float64))})
    draws = []
    for _ in range(2):
        np.random.seed(0)
        noised = s._add_noise_to_aggregated_arrays(zeros)
        draws.append(noised["w"].numpy())
        assert list(noised.keys()) == ["w", "b"] and noised["b"].numpy().dtype == np.float64
    assert draws[0].dtype == np.float32 and draws[0].shape == (200, 500)
    np.random.seed(0)
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[0], np.random.normal(0, 0.4, (200, 500)))
    std = 0.8 * 2.0 / 4  # noise_multiplier * clipping_norm / m, Flower's calibration
    # 100,000 draws: the sample std's relative standard error is 1/sqrt(2n) ~ 0.0022; 5 of them
    assert abs(draws[0].std() / std - 1) < 0.011 and abs(draws[0].mean()) < 5 * std / 316
    assert np.all(zeros["w"].numpy() == 0)  # the aggregate handed in is not changed in place


def test_central_dp_is_refused_when_flower_no_longer_adds_noise_where_umeml_replaces_it(monkeypatch):
    from umeml.flower import pins

    monkeypatch.setattr(pins, "central_dp_problems", lambda: ["aggregate_train no longer calls it"])
    fed = experiment(central_dp={"enabled": True}).federation
    with pytest.raises(ConfigError, match="federation.central_dp: .*aggregate_train no longer calls it"):
        with_central_dp(build_strategy(fed), fed, 3)
    plain = build_strategy(experiment().federation)
    assert with_central_dp(plain, experiment().federation, 3) is plain  # without central DP nothing is checked


def test_server_side_central_dp_records_epsilon(app, tmp_path):
    cfg = experiment(rounds=3, central_dp={"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 0.5})
    # site A1 (node 102) misses round 3: the noise is calibrated to the one update averaged
    final, _ = run(app, tmp_path, cfg, drop={102: lambda kind, rnd: kind == "train" and rnd == 3})
    assert final["rounds"] == 3
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    central = [e for e in ledger["entries"] if e["kind"] == "central"]
    assert [e["round"] for e in central] == [1, 2, 3]
    assert [e["sites_aggregated"] for e in central] == [2, 2, 1]
    for i, e in enumerate(central):  # sample rate = all training sites each round, one release per round
        assert e["sample_rate"] == 1.0 and e["steps"] == 1 and e["accountant"] == "rdp"
        assert e["epsilon"] == pytest.approx(rdp_epsilon(1.0, 1.0, i + 1, 1e-5), rel=1e-9)
    assert central[0]["epsilon"] < central[1]["epsilon"] < central[2]["epsilon"]
    assert ledger["final"]["central"]["epsilon"] == central[-1]["epsilon"]
    assert ledger["central_dp"]["clipping_norm"] == 0.5
    weights = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)["weights"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_client_side_clipping_bounds_every_update(app, tmp_path):
    cfg = experiment(rounds=1, strategy="fedprox", proximal_mu=0.1,
                     central_dp={"enabled": True, "clipping": "client", "noise_multiplier": 0.5, "clipping_norm": 0.05})
    _, grid = run(app, tmp_path, cfg)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(m.content["config"]["clipping_norm"] == 0.05 for m in sent)
    assert all(m.content["config"]["proximal-mu"] == 0.1 for m in sent)
    for msg, reply in zip(sent, [m for m in grid.received if m.metadata.message_type == "train"]):
        before, after = msg.content["arrays"], reply.content["arrays"]
        norm = np.sqrt(sum(((after[k].numpy().astype(np.float64) - before[k].numpy()) ** 2).sum() for k in before.keys()))
        assert 0 < norm <= 0.05 * (1 + 1e-4)
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert ledger["final"]["central"]["epsilon"] == pytest.approx(rdp_epsilon(0.5, 1.0, 1, 1e-5))
    # a resumed run composes its releases with the earlier ones
    cfg2 = experiment(rounds=2, strategy="fedprox", proximal_mu=0.1,
                      central_dp={"enabled": True, "clipping": "client", "noise_multiplier": 0.5, "clipping_norm": 0.05})
    coord = Coordinator(cfg2, tmp_path / "run", expected_sites=len(SITES), held_out=("A2",), resume=True,
                        wait_timeout=5, printer=lambda s: None)
    final = coord.run(LocalGrid(app, len(SITES)))
    central = [e for e in json.loads((tmp_path / "run" / "privacy.json").read_text())["entries"]]
    assert [e["round"] for e in central] == [1, 2]
    assert final["privacy"]["central"]["epsilon"] == pytest.approx(rdp_epsilon(0.5, 1.0, 2, 1e-5))


def test_target_epsilon_stops_training_and_still_evaluates(app, tmp_path):
    # room for exactly two releases: round 3 would exceed the target, round 1 and 2 fit
    target = rdp_epsilon(1.0, 1.0, 2, 1e-5) * 1.001
    cfg = experiment(rounds=4, evaluate_every=4,
                     central_dp={"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 0.5,
                                 "target_epsilon": target})
    final, grid = run(app, tmp_path, cfg)
    assert final["rounds"] == 2
    rounds_trained = {m.content["config"]["server-round"] for m in grid.sent if m.metadata.message_type == "train"}
    assert rounds_trained == {1, 2}
    stop = final["stopped"]
    assert stop["before_round"] == 3 and stop["target_epsilon"] == target
    assert stop["epsilon"] <= target < stop["epsilon_after_next_round"]
    assert stop["epsilon_after_next_round"] == pytest.approx(rdp_epsilon(1.0, 1.0, 3, 1e-5), rel=1e-9)
    assert "would take epsilon" in stop["reason"] and "target_epsilon" in stop["reason"]
    # the final evaluation ran on the round-2 weights (evaluate_every 4 would otherwise skip it)
    assert final["held_out"]["A2"]["n"] == 20 and "grade" in final["held_out"]["A2"]["tasks"]
    assert {m.content["config"]["server-round"] for m in grid.sent if m.metadata.message_type == "evaluate"} == {2}
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert [e["round"] for e in ledger["entries"] if e["kind"] == "central"] == [1, 2]
    assert ledger["stopped"] == stop and ledger["final"]["stopped"] == stop["reason"]
    assert final["privacy"]["central"]["epsilon"] <= target
    assert "would take epsilon" in (tmp_path / "run" / "coordinator.log").read_text()


def test_target_epsilon_below_one_release_trains_nothing(app, tmp_path):
    cfg = experiment(rounds=2, central_dp={"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 0.5})
    final, grid = run(app, tmp_path, cfg)
    assert final["rounds"] == 0 and final["stopped"]["before_round"] == 1
    assert "train" not in {m.metadata.message_type for m in grid.sent}
    assert final["held_out"]["A2"]["n"] == 20  # the initial weights are still evaluated


def test_target_epsilon_needs_central_dp():
    with pytest.raises(ConfigError, match=r"central_dp.target_epsilon: set, but federation.central_dp.enabled is false"):
        experiment(central_dp={"target_epsilon": 3.0})
