"""Flower's real simulation engine (Ray) through `umeml-server simulate`, and comparison mode."""

import json

import pytest

from umeml.config import dump_config
from umeml.server.cli import main

from fed_helpers import tiny_experiment

# drop_path at its default (0.1), as this experiment file has always had it
EXPERIMENT = dump_config(tiny_experiment(epochs=2, bootstrap=20, split={"test_sites": ["A2"]}, model={"drop_path": 0.1}))


@pytest.fixture
def exp(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT)
    return path


@pytest.mark.slow  # Ray (run_simulation)
@pytest.mark.timeout(600)
def test_simulate_prints_held_out_table_and_resumes(exp, tiny_cohort_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--config", str(exp), "--data", str(tiny_cohort_dir), "--out", str(out), "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "round 1/1" in text and "held-out metrics after 1 rounds (fedavg)" in text
    assert "combined" in text and "pooled" in text
    final = json.loads((out / "final.json").read_text())
    site = final["held_out"]["A2"]["tasks"]["grade"]["auc_macro"]["value"]
    assert final["held_out_combined"]["grade"]["auc_macro"]["value"] == pytest.approx(site)
    # pooled over the one held-out site equals that site's own evaluation
    assert final["pooled"]["grade"]["auc_macro"]["value"] == pytest.approx(site, abs=1e-9)
    # resume to 2 rounds: round 1 is not recomputed
    assert main(["simulate", "--resume", str(out), "--rounds", "2"]) == 0
    text = capsys.readouterr().out
    assert "round 1/2" not in text and "round 2/2" in text
    final = json.loads((out / "final.json").read_text())
    assert final["rounds"] == 2 and len(final["seconds_per_round"]) == 2
    # the report is written at the end, with the pooled held-out predictions a simulation keeps
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"curves.png", "roc_grade.png", "roc_subtype.png", "kaplan_meier.png", "forest_survival.png"} <= plots
    assert "report: " in text and (out / "report.html").is_file()


@pytest.mark.slow  # Ray (run_simulation) for the federated arm
@pytest.mark.timeout(900)
def test_compare_mode(exp, tiny_cohort_dir, tmp_path, capsys):
    assert main(["simulate", "--config", str(exp), "--data", str(tiny_cohort_dir), "--out", str(tmp_path / "cmp"),
                 "--compare"]) == 0
    text = capsys.readouterr().out
    for mode in ("centralized", "federated", "local-only A0", "local-only A1"):
        assert mode in text
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert summary["held_out_sites"] == ["A2"] and summary["training_sites"] == ["A0", "A1"]
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "Centralized vs federated vs local-only" in page and "href='federated/report.html'" in page
    assert (tmp_path / "cmp" / "federated" / "report.html").is_file()


def test_shipped_app_bundle_matches_what_start_writes(tmp_path):
    from pathlib import Path

    from umeml.server.deploy import write_app_dir

    shipped = Path(__file__).resolve().parents[1] / "deploy" / "flwr-app" / "pyproject.toml"
    written = write_app_dir(tmp_path / "app") / "pyproject.toml"
    assert shipped.read_text() == written.read_text()
    assert 'serverapp = "umeml.server.app:app"' in shipped.read_text()


def test_dp_epsilon_flag_requires_local_dp_at_that_budget(exp, tmp_path, capsys):
    from umeml.config import load_config
    from umeml.errors import ConfigError
    from umeml.server.cli import with_local_dp

    cfg = with_local_dp(load_config(exp), 8)
    assert cfg.federation.local_dp.enabled and cfg.federation.local_dp.target_epsilon == 8.0
    assert cfg.federation.local_dp.delta == load_config(exp).federation.local_dp.delta
    with pytest.raises(ConfigError, match="--dp-epsilon: must be > 0"):
        with_local_dp(load_config(exp), 0)
    # refused before any data is generated or any work starts
    assert main(["simulate", "--config", str(exp), "--dp-epsilon", "-1", "--out", str(tmp_path / "run")]) != 0
    assert "--dp-epsilon" in capsys.readouterr().err and not (tmp_path / "run" / "data").exists()
