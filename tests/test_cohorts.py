"""Cohorts beyond glioma: the tasks decide which labels a table needs, label maps by config,
an empty subtype is missing (never the string "nan"), survival-only runs centrally and federated."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from umeml.cli import main as umeml_main
from umeml.config import config_from_dict
from umeml.data.cohort import load_data_dir
from umeml.data.labels import clean_code, label_counts, required_columns
from umeml.errors import ConfigError, DataValidationError

from fed_helpers import tiny_experiment


def _copy_cohort(src, dest, edit):
    """A copy of a data directory (bags linked, not copied) whose table went through ``edit``."""
    dest.mkdir()
    (dest / "bags").symlink_to(src / "bags")
    (dest / "signatures.csv").write_bytes((src / "signatures.csv").read_bytes())
    table = pd.read_csv(src / "table.csv", dtype={"slide_id": str, "site": str})
    edit(table).to_csv(dest / "table.csv", index=False)
    return dest


@pytest.fixture(scope="module")
def survival_only_dir(tiny_cohort_dir, tmp_path_factory):
    """The tiny cohort without its oncotree_code column."""
    return _copy_cohort(tiny_cohort_dir, tmp_path_factory.mktemp("so") / "data",
                        lambda t: t.drop(columns=["oncotree_code"]))


SURVIVAL_YAML = """\
name: survival-only
seed: 0
tasks: [survival]
data: {max_patches: 32}
model: {hidden_dim: 16, n_prototypes: 3, n_registers: 2, dropout: 0.0, drop_path: 0.0}
train: {epochs: 2, batch_size: 8, lr: 0.003, bootstrap: 20}
"""


def test_the_tasks_decide_the_required_columns():
    assert "oncotree_code" not in required_columns(["survival"])
    assert "oncotree_code" in required_columns(["survival", "grade"])
    assert "oncotree_code" in required_columns(None)  # no tasks given: all of them


def test_a_table_without_subtypes_is_refused_for_grade_and_subtype(survival_only_dir):
    with pytest.raises(DataValidationError, match="missing required column.*oncotree_code.*tasks: \\[survival\\]"):
        load_data_dir(survival_only_dir)
    cohort = load_data_dir(survival_only_dir, tasks=("survival",))
    assert len(cohort) == 60 and all(p.subtype is None for p in cohort.patients)
    assert cohort.subtype_index(0) == -1 and cohort.grade_index(0) == -1
    assert cohort.summary()["subtype_missing"] == 60


def test_survival_only_table_checks_and_trains(survival_only_dir, tmp_path, capsys, one_torch_thread):
    cfg = tmp_path / "survival.yaml"
    cfg.write_text(SURVIVAL_YAML)
    assert umeml_main(["check", "--data", str(survival_only_dir)]) == 1  # all tasks: the column is needed
    assert umeml_main(["check", "--data", str(survival_only_dir), "--config", str(cfg)]) == 0
    assert "subtypes: none (not needed by the tasks)" in capsys.readouterr().out
    out = tmp_path / "run"
    assert umeml_main(["train", "--config", str(cfg), "--data", str(survival_only_dir), "--out", str(out),
                       "--quiet", "--no-report"]) == 0
    printed = capsys.readouterr().out
    assert "c_index" in printed and "grade" not in printed and "subtype" not in printed
    final = json.loads((out / "final.json").read_text())
    assert set(final["test"]) == {"survival"}
    assert 0.0 <= final["test"]["survival"]["c_index"]["value"] <= 1.0


def test_survival_only_table_simulates(survival_only_dir, tmp_path, one_torch_thread):
    from umeml.client.app import SimulatedSites, build_client_app
    from umeml.data.source import CohortSource
    from umeml.server.coordinator import Coordinator

    from fed_helpers import LocalGrid

    cfg = dataclasses.replace(tiny_experiment(bootstrap=20), tasks=("survival",))
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(survival_only_dir))))
    lines: list[str] = []
    coord = Coordinator(cfg, tmp_path / "fed", expected_sites=3, held_out=("A2",), wait_timeout=5, printer=lines.append)
    final = coord.run(LocalGrid(app, 3))
    assert final["rounds"] == 2 and set(final["held_out"]["A2"]["tasks"]) == {"survival"}
    assert set(final["held_out_combined"]) - {"n_suppressed"} == {"survival"}
    assert not any("grade" in line or "subtype" in line for line in lines)
    from umeml.server.cli import format_table

    table = format_table(final)  # the held-out table has the survival column only
    assert "survival c_index" in table and "grade" not in table and "subtype" not in table


def _blank_first_subtype(table):
    table.loc[table["case_id"] == table.loc[0, "case_id"], "oncotree_code"] = ""
    return table


def test_an_empty_subtype_is_missing_not_nan(tiny_cohort_dir, tmp_path):
    data = _copy_cohort(tiny_cohort_dir, tmp_path / "data", _blank_first_subtype)
    with pytest.raises(DataValidationError) as err:
        load_data_dir(data)
    text = str(err.value)
    assert "oncotree_code is missing (empty)" in text and "nan" not in text.lower()
    cohort = load_data_dir(data, tasks=["survival"])  # survival needs no subtype: a missing one is fine
    assert cohort.patients[0].subtype is None and cohort.summary()["subtype_missing"] == 1
    assert clean_code(float("nan")) is None and clean_code("  ") is None and clean_code(" GBM ") == "GBM"
    assert label_counts([0, -1, 2, 2], 3) == [1, 0, 2]


OTHER_CANCER = {"subtypes": ["LUAD", "LUSC"], "grade_map": {"LUAD": "G2", "LUSC": "G3"}, "grades": ["G2", "G3"]}


def _as_lung(table):
    table["oncotree_code"] = np.where(table["oncotree_code"].isin(["GBM", "AASTR", "AOAST"]), "LUSC", "LUAD")
    return table


def test_label_maps_for_another_cancer_by_config(tiny_cohort_dir, tmp_path, one_torch_thread):
    from umeml.train.central import train_central

    data = _copy_cohort(tiny_cohort_dir, tmp_path / "data", _as_lung)
    with pytest.raises(DataValidationError, match="'LUAD' is not a known subtype"):
        load_data_dir(data)  # the glioma default does not know lung codes
    cfg = tiny_experiment(bootstrap=0, data=OTHER_CANCER)
    cohort = load_data_dir(data, cfg.data, cfg.tasks)
    assert cohort.subtypes == ("LUAD", "LUSC") and cohort.grades == ("G2", "G3")
    luad = [i for i, p in enumerate(cohort.patients) if p.subtype == "LUAD"]
    assert cohort.subtype_index(luad[0]) == 0 and cohort.grade_index(luad[0]) == 0
    final = train_central(cfg, cohort, tmp_path / "run", progress=False)
    assert set(final["test"]) == {"grade", "subtype", "survival"}
    from umeml.model import load

    model, meta = load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert meta["subtypes"] == ["LUAD", "LUSC"] and meta["grades"] == ["G2", "G3"]
    assert model.heads.heads["subtype"].out_features == 2 and model.heads.heads["grade"].out_features == 2


def test_a_grade_task_needs_a_grade_for_every_configured_subtype():
    raw = {"tasks": ["grade", "survival"], "data": {"subtypes": ["LUAD", "LUSC"], "grade_map": {"LUAD": "II"}}}
    with pytest.raises(ConfigError, match="data.grade_map: the task grade needs a grade .*LUSC"):
        config_from_dict(raw, "x.yaml")
    config_from_dict({**raw, "tasks": ["subtype", "survival"]}, "x.yaml")  # no grade task: no grade needed
    with pytest.raises(ConfigError, match="data.subtypes: give distinct"):
        config_from_dict({"data": {"subtypes": ["A", "A"]}}, "x.yaml")
