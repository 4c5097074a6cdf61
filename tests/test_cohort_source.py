"""CohortSource: one value for where a cohort lives (data dir, or table + signatures + bags), and
``umeml-client check`` reading a site's data exactly as a run of the experiment will."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from umeml.cli import build_parser
from umeml.cli import main as umeml_main
from umeml.client.app import deployed_site
from umeml.client.cli import main as client_main
from umeml.config import config_from_dict, load_config, load_site_config
from umeml.data.source import CohortSource
from umeml.errors import ConfigError, DataValidationError, MissingPathError


def _files(d):
    return CohortSource(table=str(d / "table.csv"), signatures=str(d / "signatures.csv"), bags=str(d / "bags"))


def test_each_form_loads_the_same_cohort(tiny_cohort_dir):
    from_dir = CohortSource(data_dir=str(tiny_cohort_dir)).load()
    from_files = _files(tiny_cohort_dir).load()
    assert from_dir.summary() == from_files.summary()
    genomics_only = CohortSource(table=str(tiny_cohort_dir / "table.csv"),
                                 signatures=str(tiny_cohort_dir / "signatures.csv")).load()
    assert genomics_only.bag_dir is None and genomics_only.summary()["with_pathology"] == 0
    assert len(genomics_only) == len(from_dir)


@pytest.mark.parametrize("values, rule", [
    ({}, "data_dir / table: give exactly one of them"),
    ({"data_dir": "d", "table": "t.csv"}, "data_dir / table: give exactly one of them"),
    ({"data_dir": "d", "bags": "b"}, "bags: only with table"),
])
def test_a_source_names_exactly_one_cohort(values, rule):
    with pytest.raises(ConfigError, match=rule):
        CohortSource(**values)


@pytest.mark.parametrize("source", [
    CohortSource(data_dir="/data/site"),
    CohortSource(table="/d/t.csv"),
    CohortSource(table="/d/t.csv", signatures="/d/s.csv", bags="/d/bags"),
])
def test_round_trips(source):
    settings = source.settings()
    assert set(settings) == {"sim-data-dir", "sim-table", "sim-signatures", "sim-bags"}
    assert all(isinstance(v, str) for v in settings.values())  # Flower config values
    assert CohortSource.from_settings(settings) == source
    assert CohortSource.from_settings(source.settings("site-"), prefix="site-") == source
    assert CohortSource.from_dict(json.loads(json.dumps(source.to_dict()))) == source
    assert hash(source) == hash(CohortSource.from_dict(source.to_dict()))  # the ClientApp caches by it


def test_settings_without_a_cohort_and_old_simulation_files():
    assert CohortSource.from_settings({"run-dir": "/r"}) is None  # a deployment: no pooled metrics
    # simulation.json as written before CohortSource moved into umeml.data
    old = {"data_dir": "/abs/data", "table": None, "signatures": None, "bags": None}
    assert CohortSource.from_dict(old) == CohortSource(data_dir="/abs/data")
    with pytest.raises(ConfigError, match="simulation.json: source: unknown key"):
        CohortSource.from_dict({**old, "tabel": "x"}, "simulation.json: source")


def test_from_args_and_from_site_file(tmp_path, tiny_cohort_dir):
    args = build_parser().parse_args(["check", "--table", "t.csv", "--signatures", "s.csv"])
    assert CohortSource.from_args(args) == CohortSource(table="t.csv", signatures="s.csv")
    args = build_parser().parse_args(["check", "--data", str(tiny_cohort_dir)])
    assert CohortSource.from_args(args) == CohortSource(data_dir=str(tiny_cohort_dir))
    with pytest.raises(ConfigError, match="--data / --table: give exactly one of them"):
        CohortSource.from_args(argparse.Namespace(data=None, table=None))
    with pytest.raises(ConfigError, match="--signatures: only with --table"):
        CohortSource.from_args(argparse.Namespace(data="d", table=None, signatures="s.csv", bags=None))
    site = tmp_path / "site.yaml"
    site.write_text("site_id: H\ntable: data/t.csv\nbags: feats\n")
    assert load_site_config(site).cohort_source == CohortSource(table=str(tmp_path / "data" / "t.csv"),
                                                                bags=str(tmp_path / "feats"))
    site.write_text("site_id: H\ndata_dir: d\nsignatures: s.csv\n")
    with pytest.raises(ConfigError, match=r"site.yaml: signatures: only with table"):
        load_site_config(site)
    assert CohortSource(data_dir="rel").resolved() == CohortSource(data_dir=str(Path.cwd() / "rel"))


def test_errors_name_the_missing_file(tmp_path, tiny_cohort_dir, capsys):
    # a path given that does not exist is a usage error (exit 2), named by its flag, before any data is read
    with pytest.raises(FileNotFoundError, match=f"--data {tmp_path / 'nowhere'}: data directory not found"):
        CohortSource(data_dir=str(tmp_path / "nowhere")).load()
    with pytest.raises(MissingPathError, match=f"--table {tmp_path / 'nope.csv'}: cohort table not found"):
        CohortSource(table=str(tmp_path / "nope.csv")).load()
    with pytest.raises(MissingPathError, match=f"--signatures {tmp_path / 'sig.csv'}: signatures file not found"):
        CohortSource(table=str(tiny_cohort_dir / "table.csv"), signatures=str(tmp_path / "sig.csv")).load()
    # every bad path at once
    with pytest.raises(MissingPathError, match="signatures file not found; --bags .*: feature bag folder not found"):
        CohortSource(table=str(tiny_cohort_dir / "table.csv"), signatures=str(tmp_path / "sig.csv"),
                     bags=str(tmp_path / "bags")).load()
    assert umeml_main(["check", "--data", str(tmp_path / "nowhere")]) == 2
    assert f"--data {tmp_path / 'nowhere'}: data directory not found" in capsys.readouterr().err
    assert umeml_main(["check", "--data", str(tiny_cohort_dir), "--table", "t.csv"]) == 2
    assert "--data / --table: give exactly one of them" in capsys.readouterr().err


# ------------------------------------------------------------------------ check reads as the run reads
def _site(tmp_path, tiny_cohort_dir, edit=None):
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort_dir, data)
    if edit is not None:
        df = pd.read_csv(data / "table.csv", dtype={"slide_id": str})
        edit(df)
        df.to_csv(data / "table.csv", index=False)
    site = tmp_path / "site.yaml"
    site.write_text(f"site_id: A0\ndata_dir: {data}\nstate_dir: {tmp_path / 'state'}\n")
    return site


def _run_site(site_file, experiment):
    """The site as the ClientApp builds it for a run of ``experiment`` (deployed: node config)."""
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(site_file)}, state=RecordDict(),
                      run_config={})
    return deployed_site(context, load_config(experiment))


def test_check_uses_the_experiments_data_settings(tmp_path, tiny_cohort_dir, capsys):
    """An experiment without OAST in its grade map: the run refuses the data; check with defaults
    passes (so it cannot be trusted alone), check with the experiment fails like the run."""
    site = _site(tmp_path, tiny_cohort_dir)
    grade_map = {"ASTR": "II", "ODG": "II", "AASTR": "III", "AOAST": "III", "GBM": "IV"}
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(json.dumps({"data": {"grade_map": grade_map}}))
    with pytest.raises(DataValidationError) as run_error:
        _run_site(site, experiment)
    assert "oncotree_code 'OAST' is not a known subtype" in str(run_error.value)

    assert client_main(["check", "--site", str(site)]) == 0
    assert "--config EXPERIMENT.yaml" in capsys.readouterr().err  # says what it did not check
    assert client_main(["check", "--site", str(site), "--config", str(experiment)]) == 1
    err = capsys.readouterr().err
    assert "check FAILED for site A0" in err
    assert all(str(p) in err for p in run_error.value.problems)  # the very problems the run has


def test_check_passes_where_the_experiment_imputes(tmp_path, tiny_cohort_dir, capsys):
    def nan_genomics(df):
        col = next(c for c in df.columns if c.endswith("_rnaseq"))
        df.loc[df["case_id"] == df.loc[0, "case_id"], col] = float("nan")

    site = _site(tmp_path, tiny_cohort_dir, nan_genomics)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("data: {genomic_nan_policy: impute_median}\n")
    assert _run_site(site, experiment).cohort.imputed_values == 1
    assert client_main(["check", "--site", str(site)]) == 1  # the default policy refuses NaN
    assert "genomic_nan_policy: impute_median" in capsys.readouterr().err
    assert client_main(["check", "--site", str(site), "--config", str(experiment)]) == 0
    assert "site A0: check OK" in capsys.readouterr().out
    # the data settings that reach the site travel as the coordinator's JSON: same cohort either way
    sent = config_from_dict(json.loads(json.dumps({"data": {"genomic_nan_policy": "impute_median"}})))
    assert load_site_config(site).cohort_source.load(sent.data).imputed_values == 1


def test_start_checks_with_the_experiment_before_joining(tmp_path, tiny_cohort_dir, capsys):
    site = _site(tmp_path, tiny_cohort_dir)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("data: {grade_map: {ASTR: II, ODG: II, AASTR: III, AOAST: III, GBM: IV}}\n")
    # refused before any connection (nothing listens on port 1)
    assert client_main(["start", "--site", str(site), "--config", str(experiment), "--server", "127.0.0.1:1"]) == 1
    assert "site data check FAILED, not joining" in capsys.readouterr().err
