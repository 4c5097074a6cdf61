import dataclasses
from pathlib import Path

import pytest

from umeml.config import ExperimentConfig, config_from_dict, dump_config, load_config
from umeml.errors import ConfigError

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if not p.name.startswith("site"))
SITE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("site*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "grading.yaml", "classification.yaml", "survival.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_paper_hyperparameters():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "grading.yaml")
    assert (cfg.model.hidden_dim, cfg.model.n_prototypes, cfg.model.n_registers) == (256, 5, 3)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs) == (2e-4, 1e-4, 10)


def test_configs_are_frozen():
    cfg = config_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"modle": {}}, "unknown key(s) modle"),
        ({"model": {"hidden": 3}}, "model.hidden"),
        ({"model": {"hidden_dim": "big"}}, "model.hidden_dim: expected an integer"),
        ({"model": {"hidden_dim": 0}}, "model.hidden_dim: must be >= 1"),
        ({"model": {"dropout": 1.5}}, "model.dropout: must be <= 0.95"),
        ({"model": {"tau": 0}}, "model.tau: must be > 0"),
        ({"model": {"fusion": "sum"}}, "model.fusion: must be one of"),
        ({"model": {"use_registers": "yes"}}, "model.use_registers: expected true or false"),
        ({"model": {"hidden_dim": 30, "n_heads": 4}}, "must be divisible"),
        ({"model": {"name": "nope"}}, "model.name: unknown model 'nope'; available: abmil, late_fusion, linear"),
        ({"tasks": ["grade", "grade"]}, "tasks"),
        ({"tasks": ["staging"]}, "tasks[0]: must be one of"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
        ({"data": {"grade_map": {"GBM": "V"}}}, "data.grade_map"),
        ({"survival": {"n_bins": 1}}, "survival.n_bins: must be >= 2"),
    ],
)
def test_bad_values_name_the_file_and_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="exp.yaml")
    assert "exp.yaml" in str(err.value)
    assert needle in str(err.value)


def test_load_config_names_file_for_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  hidden_dim: -4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.hidden_dim: must be >= 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", SITE_CONFIGS, ids=lambda p: p.name)
def test_site_configs_load(path):
    from umeml.config import load_site_config

    site = load_site_config(path)
    assert site.site_id and Path(site.data_dir).is_absolute()


def test_site_config_rules(tmp_path):
    from umeml.config import load_site_config

    f = tmp_path / "site.yaml"
    f.write_text("site_id: X\n")
    with pytest.raises(ConfigError, match="give exactly one of them"):
        load_site_config(f)
    f.write_text("data_dir: d\n")
    with pytest.raises(ConfigError, match="site_id"):
        load_site_config(f)
    f.write_text("site_id: X\ndata_dir: d\nk_min_patients: 0\n")
    with pytest.raises(ConfigError, match="k_min_patients: must be >= 1"):
        load_site_config(f)


def test_sgd_optimizer_for_dp_training():
    import torch

    from umeml.model import build_model
    from umeml.train.loop import make_optimizer

    cfg = config_from_dict({"train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.5}})
    model = build_model(config_from_dict({"model": {"name": "snn", "hidden_dim": 16}}).model, 0, (4, 3), {"grade": 3})
    opt = make_optimizer(model, cfg.train)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5 and opt.defaults["lr"] == 0.1
    with pytest.raises(ConfigError, match="train.momentum"):
        config_from_dict({"train": {"optimizer": "sgd", "momentum": 1.0}}, source="exp.yaml")
