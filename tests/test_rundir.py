"""The run directory's schema (umeml.rundir): records, the one metrics.csv shape of both kinds of
run, version-1 run dirs, unknown versions and the atomic write."""

import csv
import json

import pytest

from umeml.cli import main as umeml_main
from umeml.client.app import SimulatedSites, build_client_app
from umeml.data.cohort import load_data_dir
from umeml.data.source import CohortSource
from umeml.report import ReportError, write_report
from umeml.rundir import (
    METRICS_COLUMNS,
    SCHEMA_VERSION,
    CentralizedFinal,
    EpochRecord,
    FederatedFinal,
    MetricRow,
    RoundRecord,
    RunDir,
    RunDirError,
    atomic_write,
    atomic_write_text,
    final_from_json,
    read_final,
    read_metrics,
)
from umeml.server.coordinator import Coordinator
from umeml.train.central import train_central

from fed_helpers import LocalGrid, tiny_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRADE = {"auc_macro": {"value": 0.75, "ci_low": 0.6, "ci_high": 0.9, "n": 20, "n_classes": 3},
         "confusion_matrix": {"value": [[1, 0], [0, 1]], "n": 2}}


def test_records_round_trip():
    epoch = EpochRecord(3, 1.25, 0.001, 1.5, {"grade": GRADE}, n_train=40, n_val=8)
    assert EpochRecord.from_json(json.loads(json.dumps(epoch.to_json()))) == epoch
    entry = {"round": 2, "train": [{"site": "A0", "train_loss": 0.9, "num-examples": 16}, {"site": "A1", "rejected": "NaN"}],
             "accepted": 1, "evaluation": {"held_out": {"A2": {"site": "A2", "n": 20, "tasks": {"grade": GRADE}}}},
             "privacy": [{"kind": "central", "epsilon": 1.0}], "train_wave_seconds": 0.5, "seconds": 1.0,
             "overhead_seconds": 0.2, "stopped": {"reason": "budget"}, "a_later_key": [1]}
    rnd = RoundRecord.from_json(entry)
    assert rnd.extra == {"a_later_key": [1]} and rnd.to_json() == entry and list(rnd.to_json()) == list(entry)
    central = CentralizedFinal(experiment="e", model="umeml", seed=1, test_sites=["A2"], n_test=20, test={"grade": GRADE})
    fed = FederatedFinal(experiment="e", strategy="fedavg", rounds=2, held_out_sites=["A2"],
                         held_out=entry["evaluation"]["held_out"], seconds_per_round=[1.0, 1.1])
    for final in (central, fed):
        payload = json.loads(json.dumps(final.to_json()))
        assert payload["schema_version"] == SCHEMA_VERSION and list(payload)[:3] == ["schema_version", "experiment", "mode"]
        assert final_from_json(payload) == final
    row = MetricRow("round", 2, "held_out", "auc_macro", 0.75, site="A2", n=20, task="grade", ci_low=0.6, ci_high=0.9)
    assert MetricRow.from_csv(row.to_csv(), "here") == row and row.name == "grade_auc_macro"


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_both_kinds_of_run_write_one_metrics_schema(tiny_cohort_dir, tmp_path):
    cfg = tiny_experiment(rounds=1, bootstrap=10, name="schema")
    train_central(cfg, load_data_dir(tiny_cohort_dir, cfg.data), tmp_path / "central", progress=False)
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(tiny_cohort_dir))))
    Coordinator(cfg, tmp_path / "fed", expected_sites=3, held_out=("A2",), wait_timeout=5,
                printer=lambda s: None).run(LocalGrid(app, 3))
    central, fed = RunDir(tmp_path / "central"), RunDir(tmp_path / "fed")
    for rd, unit, kind in ((central, "epoch", CentralizedFinal), (fed, "round", FederatedFinal)):
        assert tuple(_rows(rd.metrics)[0]) == METRICS_COLUMNS, rd
        rows = read_metrics(rd.metrics)
        assert {r.unit for r in rows} == {unit} and {r.step for r in rows} == {1}
        assert any(r.kind == "train" and r.metric == "loss" and r.value is not None for r in rows)
        assert json.loads(rd.final.read_text())["schema_version"] == SCHEMA_VERSION
        assert isinstance(read_final(rd.root), kind)
    central_rows = read_metrics(central.metrics)
    assert {r.kind for r in central_rows} == {"train", "validation"} and {r.site for r in central_rows} == {""}
    fed_rows = read_metrics(fed.metrics)
    held = [r for r in fed_rows if r.kind == "held_out" and (r.task, r.metric) == ("grade", "auc_macro")]
    assert [(r.site, r.n) for r in held] == [("A2", 20)]
    assert {r.site for r in fed_rows if r.kind == "train"} == {"A0", "A1"}
    assert [r.site for r in fed_rows if r.kind == "held_out_combined"][:1] == [""]
    assert not list(tmp_path.rglob("*.tmp"))


def _write_v1_centralized(d):
    d.mkdir()
    (d / "final.json").write_text(json.dumps({
        "experiment": "old", "mode": "centralized", "model": "umeml", "umeml_version": "0.1.0", "seed": 0,
        "test_sites": ["A2"], "n_train": 40, "n_val": 8, "n_test": 20, "best_epoch": 2, "epochs_run": 2,
        "wall_seconds": 3.0, "test": {"grade": GRADE}}))
    (d / "metrics.csv").write_text("epoch,train_loss,lr,val_loss,val_grade_auc_macro,val_survival_c_index\n"
                                   "1,2.0,0.003,2.2,0.6,\n2,1.5,0.002,2.1,0.7,0.65\n")


def _write_v1_federated(d):
    d.mkdir()
    (d / "final.json").write_text(json.dumps({
        "experiment": "old", "mode": "federated", "strategy": "fedavg", "model": "umeml", "umeml_version": "0.1.0",
        "seed": 0, "rounds": 2, "held_out_sites": ["A2"], "training_sites": ["A0", "A1"],
        "held_out": {"A2": {"site": "A2", "n": 20, "tasks": {"grade": GRADE}}}, "held_out_combined": {"grade": GRADE},
        "pooled": None, "seconds_per_round": [1.0, 1.0], "overhead_seconds_per_round": [0.1, 0.1],
        "privacy": None, "stopped": None}))
    (d / "metrics.csv").write_text(
        "round,site,kind,n,metric,value,note\n"
        "1,A0,train,16,train_loss,1.9,\n1,A1,train,,train_loss,,non-finite update\n"
        "1,A2,held_out,20,grade_auc_macro,0.6,\n1,S9,held_out,3,,,suppressed (< k patients)\n"
        "1,held_out_combined,held_out_combined,20,grade_auc_macro,0.6,\n"
        "2,A0,train,16,train_loss,1.5,\n2,A2,held_out,20,grade_auc_macro,0.75,\n")


def test_version_1_run_dirs_still_read(tmp_path):
    _write_v1_centralized(tmp_path / "c")
    rows = read_metrics(tmp_path / "c" / "metrics.csv")
    assert [(r.step, r.value) for r in rows if r.kind == "train" and r.metric == "loss"] == [(1, 2.0), (2, 1.5)]
    assert [(r.step, r.value) for r in rows if (r.task, r.metric) == ("grade", "auc_macro")] == [(1, 0.6), (2, 0.7)]
    assert [(r.step, r.value) for r in rows if r.task == "survival"] == [(2, 0.65)]
    final = read_final(tmp_path / "c")
    assert isinstance(final, CentralizedFinal) and final.schema_version == 1 and final.n_test == 20
    _write_v1_federated(tmp_path / "f")
    rows = read_metrics(tmp_path / "f" / "metrics.csv")
    assert (rows[1].site, rows[1].value, rows[1].n, rows[1].note) == ("A1", None, None, "non-finite update")
    held = [(r.step, r.site, r.n, r.value) for r in rows if (r.kind, r.task, r.metric) == ("held_out", "grade", "auc_macro")]
    assert held == [(1, "A2", 20, 0.6), (2, "A2", 20, 0.75)]
    assert [(r.site, r.n, r.note) for r in rows if r.note.startswith("suppressed")] == [("S9", 3, "suppressed (< k patients)")]
    assert [r.site for r in rows if r.kind == "held_out_combined"] == [""]
    assert read_final(tmp_path / "f").schema_version == 1
    # the report reads both through the converting reader: curves from the old metrics.csv
    for d in ("c", "f"):
        page = write_report(tmp_path / d).read_text()
        assert (tmp_path / d / "plots" / "curves.png").is_file() and "0.750" in page


def test_unknown_schema_version_fails_saying_which(tmp_path, capsys):
    _write_v1_centralized(tmp_path / "run")
    final = tmp_path / "run" / "final.json"
    final.write_text(json.dumps({**json.loads(final.read_text()), "schema_version": 99}))
    with pytest.raises(RunDirError, match=r"final\.json: schema_version 99 is not supported: .* version 1 .* to 2"):
        read_final(final)
    with pytest.raises(ReportError, match="schema_version 99"):
        write_report(tmp_path / "run")
    assert umeml_main(["report", str(tmp_path / "run")]) == 2
    assert "schema_version 99 is not supported" in capsys.readouterr().err
    metrics = tmp_path / "run" / "metrics.csv"
    metrics.write_text("when,what,how_much\n1,loss,2.0\n")
    with pytest.raises(RunDirError, match=r"metrics\.csv: columns when,what,how_much are of no metrics\.csv schema "
                                          r"this umeml reads: schema 2 has unit,step,kind"):
        read_metrics(metrics)
    metrics.write_text(",".join(METRICS_COLUMNS) + "\nround,one,train,A0,,,loss,1.0,,,\n")
    with pytest.raises(RunDirError, match=r"metrics\.csv:2: column step: 'one' is not a number"):
        read_metrics(metrics)
    metrics.write_text(",".join(METRICS_COLUMNS) + "\nround,1,train,A0\n")
    with pytest.raises(RunDirError, match=r"metrics\.csv:2: 4 cells, the header has 11 columns"):
        read_metrics(metrics)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "final.json"
    target.write_text("old")

    def half_then_fail(p):
        p.write_text('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final.json"]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new" / "metrics.csv", half_then_fail)
    assert list((tmp_path / "new").iterdir()) == []
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final.json", "new"]
