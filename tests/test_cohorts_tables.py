"""Tables beyond glioma, part 2: every column is needed only by the tasks that read it (a
grade/subtype table without survival columns checks, trains and simulates, and nothing reports
survival), the subtype column is named by config (``data.subtype_column``), and a missing needed
column is named with its file and the task that needs it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from umeml.cli import main as umeml_main
from umeml.config import config_from_dict, dump_config
from umeml.data.cohort import load_data_dir
from umeml.data.labels import column_needs, required_columns
from umeml.errors import ConfigError, DataValidationError
from umeml.rundir import SUMMARY_METRICS, metrics_of_tasks

from fed_helpers import tiny_experiment

CLASSIFY = ("grade", "subtype")


def _copy_cohort(src, dest, edit):
    """A copy of a data directory (bags linked, not copied) whose table went through ``edit``."""
    dest.mkdir(parents=True)
    (dest / "bags").symlink_to(src / "bags")
    (dest / "signatures.csv").write_bytes((src / "signatures.csv").read_bytes())
    table = pd.read_csv(src / "table.csv", dtype={"slide_id": str, "site": str})
    edit(table).to_csv(dest / "table.csv", index=False)
    return dest


def _no_survival(table):
    return table.drop(columns=["survival_months", "censorship"])


HISTOLOGY = {"subtype_column": "histology"}


def _renamed(table):
    return table.rename(columns={"oncotree_code": "histology"})


@pytest.fixture(scope="module")
def no_survival_dir(tiny_cohort_dir, tmp_path_factory):
    """The tiny cohort without its survival columns."""
    return _copy_cohort(tiny_cohort_dir, tmp_path_factory.mktemp("ns") / "data", _no_survival)


@pytest.fixture(scope="module")
def classify_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "classify.yaml"
    path.write_text(dump_config(dataclasses.replace(tiny_experiment(epochs=2, bootstrap=20), tasks=CLASSIFY)))
    return path


def test_each_column_is_needed_by_the_tasks_that_read_it():
    assert column_needs(CLASSIFY) == {"case_id": (), "slide_id": (), "oncotree_code": ("grade", "subtype")}
    assert column_needs(["survival"]) == {"case_id": (), "slide_id": (), "survival_months": ("survival",),
                                          "censorship": ("survival",)}
    assert column_needs(["grade"], "histology")["histology"] == ("grade",)
    assert set(required_columns(None)) == {"case_id", "slide_id", "survival_months", "censorship", "oncotree_code"}


def test_a_table_without_survival_loads_for_grade_and_subtype(no_survival_dir, tiny_cohort_dir):
    cohort = load_data_dir(no_survival_dir, tasks=CLASSIFY)
    assert len(cohort) == 60 and not cohort.has_survival
    assert all(p.survival_months is None and p.censorship is None for p in cohort.patients)
    assert cohort.summary()["censored_fraction"] is None and not cohort.summary()["survival_needed"]
    with pytest.raises(ValueError, match="without survival"):
        cohort.times_events()
    # a table that has the columns: they are not even read for these tasks (bad values are no problem)
    bad = _copy_cohort(tiny_cohort_dir, no_survival_dir.parent / "bad-months",
                       lambda t: t.assign(survival_months="soon", censorship=7))
    assert load_data_dir(bad, tasks=CLASSIFY).patients[0].survival_months is None
    with pytest.raises(DataValidationError, match="survival_months is missing or not a number"):
        load_data_dir(bad)


def test_missing_needed_columns_are_named_with_file_and_task_all_at_once(tiny_cohort_dir, tmp_path, capsys):
    def edit(table):
        table = _no_survival(table)
        table.loc[table["case_id"] == table.loc[0, "case_id"], "oncotree_code"] = ""
        return table

    data = _copy_cohort(tiny_cohort_dir, tmp_path / "data", edit)
    with pytest.raises(DataValidationError) as err:
        load_data_dir(data)  # all tasks: both survival columns and the empty subtype, together
    problems = err.value.problems
    assert len(problems) == 3 and all(p.source.endswith("table.csv") for p in problems)
    text = str(err.value)
    for col in ("survival_months", "censorship"):
        assert f"missing required column {col}: the task survival needs it" in text
    assert "oncotree_code is missing (empty)" in text and "nan" not in text.lower()
    assert umeml_main(["check", "--data", str(data)]) == 1
    out = capsys.readouterr()
    assert "3 data problem(s)" in out.out + out.err and "table.csv" in out.out + out.err


def test_a_table_without_survival_checks_and_trains(no_survival_dir, classify_yaml, tmp_path, capsys,
                                                     one_torch_thread):
    assert umeml_main(["check", "--data", str(no_survival_dir)]) == 1  # all tasks: survival is needed
    capsys.readouterr()
    assert umeml_main(["check", "--data", str(no_survival_dir), "--config", str(classify_yaml)]) == 0
    printed = capsys.readouterr().out
    assert "survival: not read (not needed by the tasks)" in printed and "censored" not in printed
    out = tmp_path / "run"
    assert umeml_main(["train", "--config", str(classify_yaml), "--data", str(no_survival_dir), "--out", str(out),
                       "--quiet"]) == 0
    printed = capsys.readouterr().out.replace(str(out), "RUN")  # the test's name is in its tmp path
    assert "auc_macro" in printed and "c_index" not in printed and "survival" not in printed
    final = json.loads((out / "final.json").read_text())
    assert set(final["test"]) == set(CLASSIFY)
    with np.load(out / "predictions.npz") as preds:  # no survival values kept (they were never read)
        assert not {"months", "censored", "risk"} & set(preds.files)
    page = (out / "report.html").read_text().lower()
    assert "kaplan" not in page and "c_index" not in page and "c-index" not in page
    assert not (out / "plots" / "forest_survival.png").exists() and (out / "plots" / "roc_grade.png").is_file()
    assert "survival" not in (out / "metrics.csv").read_text()


def test_a_table_without_survival_simulates_and_releases_no_histogram(tiny_cohort_dir, tmp_path, one_torch_thread):
    from umeml.client.app import SimulatedSites, build_client_app
    from umeml.data.source import CohortSource
    from umeml.server.cli import format_table
    from umeml.server.coordinator import Coordinator

    from fed_helpers import LocalGrid

    # the sites read the subtype column the experiment names (it travels in the data section)
    data = _copy_cohort(tiny_cohort_dir, tmp_path / "data", lambda t: _renamed(_no_survival(t)))
    cfg = dataclasses.replace(tiny_experiment(bootstrap=20, data=HISTOLOGY), tasks=CLASSIFY)
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(data))))
    lines: list[str] = []
    coord = Coordinator(cfg, tmp_path / "fed", expected_sites=3, held_out=("A2",), wait_timeout=5, printer=lines.append)
    final = coord.run(LocalGrid(app, 3))
    assert final["rounds"] == 2 and set(final["held_out"]["A2"]["tasks"]) == set(CLASSIFY)
    assert set(final["held_out_combined"]) - {"n_suppressed"} == set(CLASSIFY)
    assert not any("survival" in line or "c_index" in line for line in lines)
    table = format_table(final)
    assert "grade auc_macro" in table and "c_index" not in table and "survival" not in table
    # nothing was released (no histogram; no DP here), so there is no privacy ledger at all: with the
    # task survival the same run writes one for the sites' survival histograms
    assert not (tmp_path / "fed" / "privacy.json").exists() and not final.get("privacy")
    prep = json.loads((tmp_path / "fed" / "preprocessing.json").read_text())
    assert prep["survival_edges"] == [] and "survival" not in prep["heads"]


def test_a_site_sends_no_survival_histogram_without_the_task(no_survival_dir):
    from umeml.data.source import CohortSource
    from umeml.federation.site import SiteRuntime

    cfg = dataclasses.replace(tiny_experiment(), tasks=CLASSIFY)
    cohort = CohortSource(data_dir=str(no_survival_dir)).load(cfg.data, cfg.tasks)
    site = SiteRuntime("A0", cohort, cohort.site_indices("A0"), k_min=5)
    reply = site.preprocess(cfg)
    assert "survival_hist" not in reply and reply["n"] > 0


def test_a_renamed_subtype_column_by_config(tiny_cohort_dir, tmp_path, capsys, one_torch_thread):
    from umeml.train.central import train_central

    data = _copy_cohort(tiny_cohort_dir, tmp_path / "data", _renamed)
    with pytest.raises(DataValidationError, match="missing required column oncotree_code \\(data.subtype_column\\): "
                                                  "the task\\(s\\) grade and subtype need it"):
        load_data_dir(data)
    cfg = tiny_experiment(bootstrap=0, data=HISTOLOGY)
    cohort = load_data_dir(data, cfg.data, cfg.tasks)
    reference = load_data_dir(tiny_cohort_dir)
    assert [p.subtype for p in cohort.patients] == [p.subtype for p in reference.patients]
    assert "histology" not in cohort.gene_groups.all_columns
    final = train_central(cfg, cohort, tmp_path / "run", progress=False)
    assert set(final["test"]) == {"grade", "subtype", "survival"}
    yaml = tmp_path / "histology.yaml"
    yaml.write_text(dump_config(cfg))
    assert umeml_main(["check", "--data", str(data), "--config", str(yaml)]) == 0
    assert "GBM=" in capsys.readouterr().out
    # the configured column is the one read: a table that only has oncotree_code is refused, naming histology
    with pytest.raises(DataValidationError, match="missing required column histology \\(data.subtype_column\\)"):
        load_data_dir(tiny_cohort_dir, cfg.data, cfg.tasks)


def test_an_empty_cell_of_a_renamed_subtype_column_is_missing(tiny_cohort_dir, tmp_path):
    def edit(table):
        table = _renamed(table)
        table.loc[table["case_id"] == table.loc[0, "case_id"], "histology"] = ""
        return table

    data = _copy_cohort(tiny_cohort_dir, tmp_path / "data", edit)
    cfg = config_from_dict({"data": HISTOLOGY})
    with pytest.raises(DataValidationError) as err:
        load_data_dir(data, cfg.data, cfg.tasks)
    (problem,) = err.value.problems
    assert "histology is missing (empty)" in problem.rule and "nan" not in str(err.value).lower()
    cohort = load_data_dir(data, cfg.data, ["survival"])
    assert cohort.patients[0].subtype is None and cohort.summary()["subtype_missing"] == 1


@pytest.mark.parametrize("name, rule", [("", "give the table column"), ("survival_months", "its own meaning"),
                                        ("case_id", "its own meaning"), ("code_cnv", "genomic column"),
                                        (" histology", "surrounding spaces")])
def test_a_bad_subtype_column_name_is_a_config_error_naming_file_and_key(name, rule):
    with pytest.raises(ConfigError, match=f"exp.yaml: data.subtype_column: .*{rule}"):
        config_from_dict({"data": {"subtype_column": name}}, "exp.yaml")


def test_only_the_tasks_of_a_run_get_columns():
    grade = {"grade": {"auc_macro": {"value": 0.8, "n": 10}}}
    survival = {"survival": {"c_index": {"value": 0.6, "n": 10}}, "n_suppressed": 0}
    assert metrics_of_tasks([grade]) == (("grade", "auc_macro"), ("grade", "balanced_accuracy"))
    assert metrics_of_tasks([survival, None]) == (("survival", "c_index"),)
    assert metrics_of_tasks([{}]) == SUMMARY_METRICS  # nothing to go by: every column


@pytest.mark.slow  # Ray (run_simulation)
@pytest.mark.timeout(600)
def test_umeml_server_simulate_on_a_table_without_survival(no_survival_dir, classify_yaml, tmp_path, capsys):
    from umeml.server.cli import main as server_main

    out = tmp_path / "sim"
    assert server_main(["simulate", "--config", str(classify_yaml), "--data", str(no_survival_dir), "--out", str(out),
                        "--rounds", "1"]) == 0
    printed = capsys.readouterr().out.replace(str(out), "RUN")
    assert "held-out metrics after 1 rounds" in printed and "grade auc_macro" in printed
    assert "c_index" not in printed and "survival" not in printed
    final = json.loads((out / "final.json").read_text())
    assert set(final["pooled"]) == set(CLASSIFY) and not (out / "privacy.json").exists()
    assert (out / "plots" / "roc_grade.png").is_file() and not (out / "plots" / "kaplan_meier.png").exists()


def test_the_comparison_table_has_only_the_runs_tasks():
    from umeml.simulation.compare import format_comparison

    grade = {"grade": {"auc_macro": {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 10}}}
    summary = {"held_out_sites": ["A2"], "results": {"centralized": {"test": grade, "n": 10},
                                                     "federated": {"test": grade, "n": 10}}}
    text = format_comparison(summary)
    assert "grade auc_macro" in text and "subtype" not in text and "c_index" not in text


def test_a_run_without_survival_keeps_the_preprocessing_notes_in_privacy_json(no_survival_dir, tmp_path,
                                                                              one_torch_thread):
    """The notes of the preprocessing merge (how noisy statistics were used) belong to the ledger
    itself: without the task survival there is no histogram release to carry them."""
    from umeml.client.app import SimulatedSites, build_client_app
    from umeml.data.source import CohortSource
    from umeml.server.coordinator import Coordinator

    from fed_helpers import LocalGrid

    cfg = dataclasses.replace(tiny_experiment(rounds=1, stats_privacy={"enabled": True}), tasks=CLASSIFY)
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(no_survival_dir))))
    coord = Coordinator(cfg, tmp_path / "fed", expected_sites=3, held_out=("A2",), wait_timeout=5,
                        printer=lambda _: None)
    coord.run(LocalGrid(app, 3))
    ledger = json.loads((tmp_path / "fed" / "privacy.json").read_text())
    kinds = {r["kind"] for r in ledger["releases"]}
    assert "survival_histogram" not in kinds and "class_counts" in kinds  # the sites' noisy statistics
    notes = ledger["preprocessing_notes"]
    assert any(n.startswith("genomic standardisation from DP moments: noise sd") for n in notes), notes
