"""Local DP-SGD at the sites: Poisson sampling with empty batches, accounting over rounds and
resumed runs, the budget stop, FedProx outside the DP optimizer, and the privacy ledgers."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from umeml.client.app import SimulatedSites, build_client_app
from umeml.config import DPConfig, ModelConfig, load_site_config
from umeml.data.batch import PatientItem, collate
from umeml.data.source import CohortSource
from umeml.errors import ConfigError
from umeml.federation.accountants import total_epsilon
from umeml.federation.privacy import calibrate_noise, compute_epsilon, max_steps_within
from umeml.federation.stats_release import gaussian_noise_multiplier
from umeml.model import build_model
from umeml.server.coordinator import Coordinator
from umeml.train.dp import DPSGD, REFUSAL_NO_SITE_DP, resolve_dp
from umeml.train.loop import LossSettings

from fed_helpers import LocalGrid, site_runtimes, tiny_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SITES = ("A0", "A1", "A2")
LEDGER_KEYS = {"round", "site", "sample_rate", "noise_multiplier", "steps", "max_grad_norm", "epsilon", "delta",
               "accountant", "status"}


def experiment(batch_size=8, local_epochs=1, **fed):
    """These tests pin the configured schedule (batch_size, local_epochs): the DP recipe is off
    unless a test turns it on (the recipe's own tests: tests/test_partial.py,
    tests/test_dp_clip_groups.py and the lr tests at the end of this file)."""
    return tiny_experiment(name="dp-test", batch_size=batch_size, local_epochs=local_epochs,
                           **{"evaluate_every": 2, "dp_recipe": {"enabled": False}, **fed})


def local_dp(**kw):
    return {"local_dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, **kw}}


def run(tmp_path, cfg, resume=False, out="run", dp=None, grid_kw=None):
    app = build_client_app(SimulatedSites(SITES, CohortSource(data_dir=str(TINY[0])),
                                          state_root=str(tmp_path / out / "sites"), dp=dp))
    grid = LocalGrid(app, len(SITES), **(grid_kw or {}))
    coord = Coordinator(cfg, tmp_path / out, expected_sites=len(SITES), held_out=("A2",), resume=resume,
                        wait_timeout=5, printer=lambda s: None)
    return coord.run(grid), grid


TINY = []




@pytest.fixture(autouse=True, scope="module")
def _cohort(tiny_cohort_dir):
    TINY[:] = [tiny_cohort_dir]
    yield


def history(run_dir):
    return torch.load(run_dir / "resume.pt", weights_only=True)["history"]


def opacus_epsilon(entries, delta):
    """Epsilon recomputed independently with Opacus's own accountant from the recorded numbers."""
    acc = RDPAccountant()
    acc.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e["steps"] > 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta) if acc.history else 0.0


# --------------------------------------------------------------------------- settings / accounting
def test_site_decides_experiment_can_only_lower():
    site = DPConfig(enabled=True, target_epsilon=8.0, delta=1e-5, noise_multiplier=1.2)
    got, why = resolve_dp(site, DPConfig(enabled=True, target_epsilon=20.0, delta=1e-3, noise_multiplier=0.1))
    assert why is None and got.target_epsilon == 8.0 and got.delta == 1e-5 and got.noise_multiplier == 1.2
    got, _ = resolve_dp(site, DPConfig(enabled=True, target_epsilon=2.0))
    assert got.target_epsilon == 2.0
    assert resolve_dp(site, DPConfig()) == (site, None)  # the site keeps DP even if not asked
    assert resolve_dp(None, DPConfig(enabled=True)) == (None, REFUSAL_NO_SITE_DP)
    assert resolve_dp(DPConfig(), DPConfig()) == (None, None)


def test_site_file_dp_section(tmp_path):
    (tmp_path / "site.yaml").write_text(
        "site_id: H1\ndata_dir: data\ndp:\n  enabled: true\n  target_epsilon: 4\n  delta: 1.0e-6\n"
        "  max_grad_norm: 0.5\n  accountant: prv\n")
    dp = load_site_config(tmp_path / "site.yaml").dp
    assert dp == DPConfig(enabled=True, target_epsilon=4.0, delta=1e-6, max_grad_norm=0.5, accountant="prv")
    (tmp_path / "bad.yaml").write_text("site_id: H1\ndata_dir: data\ndp:\n  delta: 0\n")
    with pytest.raises(ConfigError, match=r"dp\.delta: must be > 0"):
        load_site_config(tmp_path / "bad.yaml")


def test_accounting_helpers_agree_with_opacus():
    hist = [(1.1, 0.05, 40), (0.9, 0.1, 7)]
    assert compute_epsilon(hist, 1e-5) == pytest.approx(opacus_epsilon(
        [{"noise_multiplier": a, "sample_rate": b, "steps": c} for a, b, c in hist], 1e-5), rel=1e-9)
    assert compute_epsilon([], 1e-5) == 0.0 and compute_epsilon([(1.0, 0.1, 0)], 1e-5) == 0.0
    k, eps = max_steps_within(hist, 1.0, 0.05, 500, 6.0, 1e-5)
    assert 0 < k < 500 and eps <= 6.0 < compute_epsilon(hist + [(1.0, 0.05, k + 1)], 1e-5)
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 60)
    assert compute_epsilon([(sigma, 0.05, 60)], 1e-5) <= 3.0 < compute_epsilon([(0.97 * sigma, 0.05, 60)], 1e-5)
    assert calibrate_noise(1.0, 1e-5, 0.05, 60, history=[(0.5, 0.5, 50)]) is None  # nothing left to spend


# --------------------------------------------------------------------------- DP-SGD mechanics
def _items(n, rng):
    return [PatientItem(rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=5).astype(np.float32),
                        int(rng.integers(3)), -1, int(rng.integers(4)), 12.0, 0) for _ in range(n)]


def test_empty_batch_first_is_a_noise_only_step():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_dim=16, n_prototypes=3, n_registers=2, dropout=0.0, drop_path=0.0),
                        6, (2, 3), {"grade": 3, "survival": 4})
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSGD(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2.0,
               generator=torch.Generator().manual_seed(0), secure_mode=False)
    loss = LossSettings(("grade", "survival"))
    assert dp.step(collate([], 6, 5), loss, torch.device("cpu")) == (0.0, 0)
    moved = [float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before)]
    assert all(m > 0 for m in moved)  # noise was added even though nobody was sampled
    total, n = dp.step(collate(_items(3, np.random.default_rng(0)), 6, 5), loss, torch.device("cpu"))
    assert n == 3 and np.isfinite(total)
    dp.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _site_setup(tmp_path, cfg, dp, seed=None):
    return site_runtimes(TINY[0], cfg, SITES[:2], dp=dp, state_root=tmp_path / "state", dp_seed=seed)


def test_poisson_training_with_an_empty_first_batch(tmp_path):
    cfg = experiment(batch_size=2)
    sites, prep, weights = _site_setup(tmp_path, cfg, DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=50))
    site = sites["A0"]
    n_train, q = 16, 2 / 16
    assert len(site._split(cfg)[0]) == n_train
    # a seed whose first Poisson batch is empty (the sampler draws from torch.Generator(seed))
    seed = next(s for s in range(1000)
                if not (torch.rand(n_train, generator=torch.Generator().manual_seed(s + 1)) < q).any())
    site.dp_seed = seed
    new, metrics = site.train(cfg, prep, weights, server_round=1)
    assert metrics["steps"] == 8 and metrics["empty_batches"] >= 1
    assert all(torch.isfinite(v).all() for v in new.values())
    assert any(not torch.equal(new[k], weights[k]) for k in weights)
    entry = metrics["privacy"]
    assert entry["sample_rate"] == q and entry["steps"] == 8 and entry["status"] == "trained"


def test_fedprox_term_is_applied_outside_the_dp_optimizer(tmp_path):
    cfg = experiment(batch_size=4, local_epochs=2)
    dp = DPConfig(enabled=True, noise_multiplier=0.5, max_grad_norm=1.0, target_epsilon=1000)

    def distance(mu):
        sites, prep, weights = _site_setup(tmp_path / f"mu{mu}", cfg, dp, seed=11)
        new, _ = sites["A0"].train(cfg, prep, weights, 1, proximal_mu=mu)
        return float(torch.sqrt(sum(((new[k] - weights[k]) ** 2).sum() for k in weights)))

    free, anchored = distance(0.0), distance(50.0)
    assert anchored < 0.7 * free, (free, anchored)



@pytest.mark.parametrize("with_dp", [True, False], ids=["dp", "recipe-without-dp"])
def test_the_round_schedule_scales_the_learning_rate_of_the_dp_recipe(tmp_path, with_dp):
    # federation.lr_schedule's factor reached plain training only: under DP (and the recipe's no-DP
    # twin) every round trained at the full rate, the schedule silently ignored
    cfg = experiment(dp_recipe={"enabled": True, "lr": 0.05, "momentum": 0.0, "apply_without_dp": not with_dp})
    dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=1000) if with_dp else None

    def distance(lr_scale):
        sites, prep, weights = _site_setup(tmp_path / f"s{lr_scale}", cfg, dp, seed=11)
        new, _ = sites["A0"].train(cfg, prep, weights, 1, lr_scale=lr_scale)
        return float(torch.sqrt(sum(((new[k].float() - weights[k].float()) ** 2).sum() for k in weights)))

    full, quarter = distance(1.0), distance(0.25)
    assert full > 0 and quarter == pytest.approx(0.25 * full, rel=0.3), (full, quarter)


def test_under_more_noise_the_recipe_steps_smaller_as_the_rule_says(tmp_path):
    # at epsilon 1 the lr tuned at 8 (noise multiplier 5.6x larger) diverged on the demo
    from umeml.federation.site import noise_lr_factor

    cfg = experiment(dp_recipe={"enabled": True, "lr": 0.05, "momentum": 0.0})
    dp1 = DPConfig(enabled=True, target_epsilon=1.0, max_grad_norm=1.0)
    steps = cfg.federation.rounds * 2
    expected = calibrate_noise(8.0, dp1.delta, 0.5, steps) / calibrate_noise(1.0, dp1.delta, 0.5, steps)
    assert noise_lr_factor(cfg, dp1, 0.5, 2) == pytest.approx(expected) and 0.1 < expected < 0.5
    assert noise_lr_factor(cfg, dataclasses.replace(dp1, target_epsilon=8.0), 0.5, 2) == 1.0  # as tuned
    assert noise_lr_factor(cfg, dataclasses.replace(dp1, target_epsilon=20.0), 0.5, 2) == 1.0  # never larger
    assert noise_lr_factor(cfg, dataclasses.replace(dp1, noise_multiplier=2 * calibrate_noise(8.0, dp1.delta, 0.5, steps)),
                           0.5, 2) == pytest.approx(0.5, rel=0.02)  # a configured noise multiplier counts
    fixed = experiment(dp_recipe={"enabled": True, "lr": 0.05, "momentum": 0.0, "lr_rule": "fixed"})
    assert noise_lr_factor(fixed, dp1, 0.5, 2) == 1.0

    def distance(c):
        sites, prep, weights = _site_setup(tmp_path / c.federation.dp_recipe.lr_rule, c, dp1, seed=11)
        new, metrics = sites["A0"].train(c, prep, weights, 1)
        q = metrics["privacy"]["sample_rate"]
        return float(torch.sqrt(sum(((new[k].float() - weights[k].float()) ** 2).sum() for k in weights))), q

    (scaled, q), (full, _) = distance(cfg), distance(fixed)
    assert scaled == pytest.approx(noise_lr_factor(cfg, dp1, q, 2) * full, rel=0.3), (scaled, full)

# --------------------------------------------------------------------------- federation level
def test_epsilon_accumulates_across_rounds_and_resume(tmp_path):
    cfg = experiment(**local_dp(target_epsilon=100))
    run(tmp_path, experiment(rounds=1, **local_dp(target_epsilon=100)))
    final, _ = run(tmp_path, cfg, resume=True)
    assert final["rounds"] == 2
    site_ledger = json.loads((tmp_path / "run" / "sites" / "A0" / "privacy.json").read_text())
    entries = site_ledger["entries"]
    assert site_ledger["site"] == "A0" and [e["round"] for e in entries] == [1, 2]
    assert LEDGER_KEYS <= set(entries[0]) and entries[0]["accountant"] == "rdp"
    eps = [e["epsilon"] for e in entries]
    assert 0 < eps[0] < eps[1]  # the resumed run continued the accountant, it did not restart
    for i in range(2):  # each cumulative epsilon recomputed independently from the recorded numbers
        assert eps[i] == pytest.approx(opacus_epsilon(entries[: i + 1], entries[i]["delta"]), rel=1e-9)

    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    rows = ledger["entries"]
    assert {(e["round"], e["site"]) for e in rows} == {(1, "A0"), (1, "A1"), (2, "A0"), (2, "A1")}
    assert all(LEDGER_KEYS <= set(e) and e["kind"] == "local" for e in rows)
    assert ledger["final"]["local"]["A0"]["epsilon"] == pytest.approx(eps[1])
    assert ledger["final"]["local_max_epsilon"] <= 100 and ledger["central_dp"] is None
    assert ledger["local_dp_requested"]["enabled"] is True
    # the resumed run kept the first run's notes of the preprocessing merge (it did not merge again)
    assert any(n.startswith("genomic standardisation from DP moments") for n in ledger["preprocessing_notes"])
    # the sites sent only scalars: no per-patient field in any ledger row
    assert all(isinstance(v, (int, float, str)) for e in rows for v in e.values())


def test_budget_spent_stops_training_run_continues(tmp_path):
    # 2 steps per round at q = 0.5: round 1 fits, round 2 has room for 1 step, round 3 for none; the
    # budget bounds DP-SGD together with the site's releases (survival histogram at epsilon 1, pure;
    # the Gaussians of the class counts at 1.5 and of the genomic moments at 0.5), composed
    zc, zg = gaussian_noise_multiplier(1.5, 1e-5), gaussian_noise_multiplier(0.5, 1e-5)
    target = total_epsilon([(1.0, 0.5, 3), (zc, 1.0, 1), (zg, 1.0, 1)], [1.0], 1e-5) * 1.001
    cfg = experiment(rounds=3, **local_dp(target_epsilon=target))
    final, grid = run(tmp_path, cfg)
    assert final["rounds"] == 3
    hist = history(tmp_path / "run")
    assert [e["accepted"] for e in hist] == [2, 2, 0]
    assert all("privacy budget reached: trained 1 of 2 steps" in r["note"] for r in hist[1]["train"])
    skipped = hist[2]["train"]
    assert len(skipped) == 2 and all("privacy budget spent" in r["skipped"] for r in skipped)
    # the spent sites still evaluate
    assert set(hist[2]["evaluation"]["validation"]) == {"A0", "A1"} and "A2" in hist[2]["evaluation"]["held_out"]
    # replies without weights: nothing to aggregate, the global weights stay as after round 2
    round3 = [m for m in grid.received if m.metadata.message_type == "train"][4:]
    assert len(round3) == 2 and all("arrays" not in m.content.array_records for m in round3)
    site_entries = json.loads((tmp_path / "run" / "sites" / "A0" / "privacy.json").read_text())["entries"]
    assert [(e["status"], e["steps"]) for e in site_entries] == [("trained", 2), ("partial", 1), ("budget_spent", 0)]
    assert site_entries[-1]["epsilon"] == pytest.approx(site_entries[1]["epsilon"])
    assert all(e["epsilon"] < e["epsilon_total"] <= target for e in site_entries)
    assert "privacy budget spent" in (tmp_path / "run" / "metrics.csv").read_text()
    assert "did not train: privacy budget spent" in (tmp_path / "run" / "coordinator.log").read_text()
    assert final["privacy"]["local"]["A1"]["status"] == "budget_spent"
    assert final["privacy"]["local_max_epsilon"] <= target


def test_site_without_dp_refuses_an_experiment_that_requires_it(tmp_path):
    cfg = experiment(rounds=1, **local_dp())
    final, _ = run(tmp_path, cfg, dp=DPConfig())  # the sites' own terms: no DP
    assert final["rounds"] == 1
    hist = history(tmp_path / "run")
    assert hist[0]["accepted"] == 0
    assert all(r["skipped"] == REFUSAL_NO_SITE_DP for r in hist[0]["train"])
    assert set(hist[0]["evaluation"]["validation"]) == {"A0", "A1"}
    for site in ("A0", "A1"):  # no DP-SGD entry: nothing was trained; only the preprocessing releases (the
        # federation asks for DP statistics, which a site without DP terms of its own still gives)
        ledger = json.loads((tmp_path / "run" / "sites" / site / "privacy.json").read_text())
        assert ledger["entries"] == [] and [r["kind"] for r in ledger["releases"]] == [
            "survival_histogram", "class_counts", "genomic_moments"]


def test_local_training_depends_on_seed_site_and_round_not_on_process_history(tmp_path):
    """A simulation actor plays several sites in turn: the dropout masks of one site's round must
    not depend on what the process ran before (it made simulated runs differ run to run)."""
    import dataclasses

    base = experiment()
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, dropout=0.25))
    sites, prep, weights = _site_setup(tmp_path, cfg, None)
    torch.manual_seed(123)
    first, _ = sites["A0"].train(cfg, prep, weights, server_round=1)
    torch.manual_seed(456)
    torch.rand(1000)  # another history
    second, _ = sites["A0"].train(cfg, prep, weights, server_round=1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other_round, _ = sites["A0"].train(cfg, prep, weights, server_round=2)
    assert any(not torch.equal(first[k], other_round[k]) for k in first)
