"""Centralized training end to end on synthetic and real data."""

import json

import pandas as pd
import pytest

from umeml.cli import main
from umeml.config import config_from_dict
from umeml.data.cohort import load_data_dir
from umeml.data.synth import SynthSpec, generate
from umeml.model import load

TINY_MODEL = {"hidden_dim": 16, "n_prototypes": 3, "n_registers": 2, "dropout": 0.0, "drop_path": 0.0}


@pytest.fixture(scope="module")
def learn_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn") / "c"
    generate(SynthSpec(sites=3, patients=60, seed=3, feature_dim=16, median_patches=30, min_patches=4, max_patches=120), out)
    return out


def test_training_learns_and_writes_run_dir(learn_dir, tmp_path):
    cfg = config_from_dict({
        "seed": 0, "tasks": ["grade", "subtype", "survival"],
        "data": {"max_patches": 64},
        "split": {"test_sites": ["A2"], "val_fraction": 0.2},
        "model": TINY_MODEL,
        "train": {"epochs": 10, "lr": 0.003, "batch_size": 8, "bootstrap": 50},
    })
    from umeml.train.central import train_central

    final = train_central(cfg, load_data_dir(learn_dir), tmp_path / "run", progress=False)
    test = final["test"]
    # chance is 0.5 for every AUC / c-index; 60 held-out patients cannot reach these margins by luck
    assert test["grade"]["auc_macro"]["value"] > 0.80, test["grade"]
    assert test["subtype"]["auc_macro"]["value"] > 0.70, test["subtype"]
    assert test["survival"]["c_index"]["value"] > 0.60, test["survival"]
    for task in ("grade", "subtype", "survival"):
        for m in test[task].values():
            if isinstance(m, dict) and "value" in m and not isinstance(m["value"], list):
                assert m["n"] == 60
    run = tmp_path / "run"
    assert json.loads((run / "final.json").read_text())["test_sites"] == ["A2"]
    rows = pd.read_csv(run / "metrics.csv")
    loss = rows[(rows["unit"] == "epoch") & (rows["kind"] == "train") & (rows["metric"] == "loss")]
    assert list(loss["step"]) == list(range(1, 11))
    assert loss["value"].iloc[-1] < loss["value"].iloc[0]
    model, meta = load(run / "checkpoints" / "best.pt")
    assert meta["test_sites"] == ["A2"] and len(meta["survival_edges"]) == 3
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.yaml").is_file()


def test_cli_train_real_genomics_only(tcga_dir, tmp_path, capsys):
    cfg = tmp_path / "real.yaml"
    cfg.write_text(
        "tasks: [grade, subtype, survival]\n"
        "split: {test_sites: ['06', 'DB']}\n"
        "model: {name: umeml, hidden_dim: 16, n_prototypes: 3, n_registers: 2, modalities: [genomics]}\n"
        "train: {epochs: 2, batch_size: 32, lr: 0.001, bootstrap: 20}\n"
    )
    rc = main(["train", "--config", str(cfg), "--table", str(tcga_dir / "tcga_gbmlgg_all_clean.csv.gz"),
               "--signatures", str(tcga_dir / "signatures.csv"), "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test sites 06, DB (n=74)" in out and "c_index" in out and "auc_macro" in out


def test_train_refuses_bad_config(tmp_path, capsys, tiny_cohort_dir):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {hidden_dim: 0}\n")
    assert main(["train", "--config", str(cfg), "--data", str(tiny_cohort_dir), "--out", str(tmp_path / "r")]) == 2
    assert "model.hidden_dim" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
