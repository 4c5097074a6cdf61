"""One loop over every registry (strategies, privacy accountants, the generic Registry) and the
error hierarchy: adding a strategy or an accountant is one registration, checked here."""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path

import pytest
from flwr.serverapp.strategy import Strategy

from umeml.config import CENTRAL_DP_STRATEGIES, STRATEGIES, CentralDPConfig, FederationConfig, config_from_dict
from umeml.errors import ConfigError, UmemlError
from umeml.federation.accountants import available_accountants, register_accountant
from umeml.federation.privacy import compute_epsilon
from umeml.registry import Registry
from umeml.server.strategies import available_strategies, build_strategy, central_dp_wrapper, register_strategy, with_central_dp

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ strategies
def test_strategy_registry_agrees_with_the_names_configs_accept():
    """The core's name list (config validation, --strategy) and the flwr-side registry are one set."""
    assert len(STRATEGIES) >= 7
    assert set(available_strategies()) == set(STRATEGIES)
    assert set(CENTRAL_DP_STRATEGIES) <= set(STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds_from_config(name):
    train = {"train": {"optimizer": "sgd"}} if name == "scaffold" else {}  # scaffold's option II assumes SGD
    fed = config_from_dict({"federation": {"strategy": name}, **train}).federation
    strategy = build_strategy(fed)
    assert isinstance(strategy, Strategy)
    assert strategy.fraction_evaluate == 0.0 and strategy.min_train_nodes == fed.min_train_sites


@pytest.mark.parametrize("name", CENTRAL_DP_STRATEGIES)
def test_central_dp_wraps_every_averaging_strategy(name):
    fed = FederationConfig(strategy=name, central_dp=CentralDPConfig(enabled=True))
    assert central_dp_wrapper(with_central_dp(build_strategy(fed), fed, 3)) is not None


def test_strategy_registration_refuses_duplicates_and_names_configs_would_reject():
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("fedavg")(lambda fed, common: None)
    with pytest.raises(ValueError, match=r"not in umeml.config.STRATEGIES"):
        register_strategy("fednova")(lambda fed, common: None)
    with pytest.raises(ConfigError,
                       match=r"federation.strategy: must be one of 'fedavg', .*'krum', 'scaffold' \(got 'fednova'\)"):
        config_from_dict({"federation": {"strategy": "fednova"}}, "exp.yaml")


# ------------------------------------------------------------------------------ accountants
HISTORY = [(1.1, 0.01, 500), (2.0, 0.02, 100)]


def test_accountants_registered():
    assert {"rdp", "prv"} <= set(available_accountants())


@pytest.mark.parametrize("name", available_accountants())
def test_every_accountant_accounts(name):
    dp = config_from_dict({"federation": {"local_dp": {"accountant": name}}}).federation.local_dp
    assert dp.accountant == name
    eps = compute_epsilon(HISTORY, 1e-5, name)
    assert math.isfinite(eps) and eps > 0
    assert compute_epsilon(HISTORY + [(1.1, 0.01, 500)], 1e-5, name) > eps  # composition only adds
    assert compute_epsilon([(1.0, 0.1, 0)], 1e-5, name) == 0.0  # no step, no release


def test_accountants_agree_roughly():
    """Two accountants of the same releases: PRV is tighter than RDP, never wildly different."""
    rdp, prv = compute_epsilon(HISTORY, 1e-5, "rdp"), compute_epsilon(HISTORY, 1e-5, "prv")
    assert 0.5 * rdp < prv <= rdp * 1.01


def test_accountant_registration_and_validation():
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("rdp")(lambda history, delta: 0.0)
    with pytest.raises(ConfigError, match=r"dp.accountant: must be one of 'prv', 'rdp' \(got 'gdp'\)"):
        config_from_dict({"federation": {"local_dp": {"accountant": "gdp"}}}, "exp.yaml")
    with pytest.raises(ConfigError, match="unknown accountant 'gdp'; available: prv, rdp"):
        compute_epsilon(HISTORY, 1e-5, "gdp")


# ------------------------------------------------------------------------------ Registry itself
def test_registry_names_lookup_and_errors():
    reg: Registry[int] = Registry("widget")
    assert reg.register("b")(2) == 2 and reg.register("a")(1) == 1
    assert reg.names() == ("a", "b") and list(reg) == ["a", "b"] and len(reg) == 2 and "a" in reg
    assert reg["a"] == 1 and reg.get("b", "x.widget") == 2
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(3)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("")
    with pytest.raises(ConfigError, match=r"x.widget: unknown widget 'c'; available: a, b"):
        reg.get("c", "x.widget")
    with pytest.raises(KeyError):
        reg["c"]


# ------------------------------------------------------------------------------ errors
def _modules() -> list[str]:
    packages = {"umeml": "umeml", "umeml.server": "server", "umeml.client": "client", "umeml.flower": "flower",
                "umeml.simulation": "simulation"}
    names = []
    for package, folder in packages.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__main__" or "__pycache__" in path.parts:
                continue
            names.append(".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return names


def test_every_public_error_class_derives_from_umeml_error():
    """One hierarchy: every exception class umeml defines (private control-flow ones aside)."""
    found, outside = [], []
    for name in _modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException) or cls_name.startswith("_"):
                continue
            found.append(f"{name}.{cls_name}")
            if not issubclass(cls, UmemlError):
                outside.append(f"{name}.{cls_name}")
    assert len(found) >= 12, f"only {found} found: the check would be vacuous"
    assert not outside, outside


def test_error_import_paths_kept():
    from umeml.client.app import SiteError
    from umeml.data.bags import BagError
    from umeml.errors import FederationError
    from umeml.federation.protocol import HandshakeMismatch
    from umeml.metrics import NoComparablePairsError
    from umeml.report import ReportError
    from umeml.server.certs import CertError
    from umeml.server.coordinator import FederationError as CoordinatorFederationError
    from umeml.server.deploy import RunFailed

    assert CoordinatorFederationError is FederationError
    assert issubclass(HandshakeMismatch, FederationError) and issubclass(RunFailed, FederationError)
    assert issubclass(NoComparablePairsError, ValueError)  # still caught where a ValueError is
    for cls in (SiteError, BagError, ReportError, CertError, NoComparablePairsError):
        assert issubclass(cls, UmemlError)
