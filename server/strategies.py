"""Flower's strategies chosen by name from config (one registration each), plus what umeml adds.

umeml only chooses which nodes train (training sites, never held-out ones), screens updates
before they reach the aggregate, and saves/restores strategy state for resume.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from umeml.config import DEFAULT_SERVER_LR, STRATEGIES, FederationConfig
from umeml.errors import ConfigError
from umeml.federation.scaffold import CONTROL_DELTA, SERVER_CONTROL, server_control_update
from umeml.registry import Registry

log = logging.getLogger(__name__)


StrategyBuilder = Callable[[FederationConfig, dict], FedAvg]
_STRATEGIES: Registry[StrategyBuilder] = Registry("strategy")


def register_strategy(name: str) -> Callable[[StrategyBuilder], StrategyBuilder]:
    """Decorator registering a builder ``(fed, common) -> strategy`` under ``name``.

    ``common`` holds the keyword arguments every strategy takes (train every selected site,
    no Flower-side evaluation). ``name`` must be in :data:`umeml.config.STRATEGIES`, the names
    that config validation accepts (the core cannot import this flwr-based registry); a
    duplicate name raises ``ValueError`` as well.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is not in umeml.config.STRATEGIES: add it there so that "
                         "configs (and umeml-server simulate --strategy) accept it")
    return _STRATEGIES.register(name)


def available_strategies() -> tuple[str, ...]:
    """Names of the registered strategies, sorted."""
    return _STRATEGIES.names()


@register_strategy("fedavg")
def _fedavg(fed: FederationConfig, common: dict) -> FedAvg:
    return FedAvg(**common)


def server_lr(fed: FederationConfig) -> float:
    """``federation.server_lr``, or the strategy's default when the config leaves it unset."""
    return fed.server_lr if fed.server_lr is not None else DEFAULT_SERVER_LR.get(fed.strategy, 1.0)


@register_strategy("fedavgm")
def _fedavgm(fed: FederationConfig, common: dict) -> FedAvg:
    return FedAvgM(server_learning_rate=server_lr(fed), server_momentum=fed.server_momentum, **common)


@register_strategy("fedprox")
def _fedprox(fed: FederationConfig, common: dict) -> FedAvg:
    return FedProx(proximal_mu=fed.proximal_mu, **common)


class Scaffold(FedAvgM):
    """SCAFFOLD (Karimireddy et al. 2020) on Flower's FedAvgM: the server control variate ``c``
    travels with the weights of every train message (record ``scaffold-c``); each accepted reply's
    ``scaffold-dc`` (the site's c_i+ - c_i) updates ``c`` by :func:`server_control_update` with the
    aggregate's weights and participation |S| / N; the weights are aggregated as FedAvgM does
    (``server_momentum`` 0 and ``server_lr`` 1: the paper's global step on the plain average).
    ``c`` is saved with the strategy's state (:data:`STATE_ATTRS`) for resume."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.c_global: dict[str, np.ndarray] = {}
        self._selectable = 1

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        """Flower's train messages, each with ``c`` (zeros, shaped like the weights, at the start)."""
        if not self.c_global:
            self.c_global = {k: np.zeros(a.numpy().shape, dtype=np.float32) for k, a in arrays.items()
                             if a.numpy().dtype.kind == "f"}
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self._selectable = max(1, len(grid.get_node_ids()))
        control = ArrayRecord({k: Array(v) for k, v in self.c_global.items()})
        for msg in msgs:  # Flower's messages of a round share one content record
            msg.content[SERVER_CONTROL] = control
        return msgs

    def aggregate_train(self, server_round: int, replies):
        """``c`` from the replies' control deltas, then FedAvgM on the weights alone."""
        replies = list(replies)
        deltas, weights, plain = [], [], []
        for reply in replies:
            content = RecordDict({n: r for n, r in reply.content.items() if n != CONTROL_DELTA})
            if CONTROL_DELTA in reply.content.array_records:
                delta = reply.content.array_records[CONTROL_DELTA]
                deltas.append({k: delta[k].numpy().astype(np.float32) for k in self.c_global})
                weights.append(float(next(iter(reply.content.metric_records.values()))[self.weighted_by_key]))
            else:
                log.warning("round %d: a SCAFFOLD reply without %s: its c_i counts as unchanged", server_round,
                            CONTROL_DELTA)
            plain.append(Message(metadata=reply.metadata, content=content))
        self.c_global = server_control_update(self.c_global, deltas, weights, len(deltas) / self._selectable)
        return super().aggregate_train(server_round, plain)


@register_strategy("scaffold")
def _scaffold(fed: FederationConfig, common: dict) -> FedAvg:
    if fed.server_momentum >= 0.9:  # the config default, meant for fedavgm
        log.warning("strategy scaffold with federation.server_momentum %g: this combination diverged on 3 of 5 "
                    "GBM-LGG folds (docs/benchmarks.md); 0 is the paper's plain average", fed.server_momentum)
    return Scaffold(server_learning_rate=server_lr(fed), server_momentum=fed.server_momentum, **common)


def _adaptive(fed: FederationConfig) -> dict:
    """FedAdam/FedYogi's server step eta and (when configured) adaptivity tau."""
    return {"eta": server_lr(fed), **({"tau": fed.server_tau} if fed.server_tau is not None else {})}


@register_strategy("fedadam")
def _fedadam(fed: FederationConfig, common: dict) -> FedAvg:
    return FedAdam(**_adaptive(fed), **common)


@register_strategy("fedyogi")
def _fedyogi(fed: FederationConfig, common: dict) -> FedAvg:
    return FedYogi(**_adaptive(fed), **common)


@register_strategy("fedmedian")
def _fedmedian(fed: FederationConfig, common: dict) -> FedAvg:
    return FedMedian(**common)


@register_strategy("fedtrimmedavg")
def _fedtrimmedavg(fed: FederationConfig, common: dict) -> FedAvg:
    return FedTrimmedAvg(beta=fed.trimmed_beta, **common)


@register_strategy("krum")
def _krum(fed: FederationConfig, common: dict) -> FedAvg:
    return Krum(num_malicious_nodes=fed.krum_byzantine, **common)


def build_strategy(fed: FederationConfig) -> FedAvg:
    """Flower's implementation of ``fed.strategy``, configured to train every selected site."""
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,  # umeml sends its own evaluation messages (held-out vs validation)
        "min_train_nodes": fed.min_train_sites,
        "min_available_nodes": fed.min_train_sites,
        "min_evaluate_nodes": 0,
    }
    return _STRATEGIES.get(fed.strategy, "federation.strategy")(fed, common)


UNIFORM_WEIGHT = "dp-uniform-weight"  # FedAvg weight key under central DP: every site counts once


class _SecureCentralNoise:
    """Central DP's Gaussian noise from the OS's CSPRNG instead of NumPy's global generator.

    Flower's wrappers add ``np.random.normal`` noise (``flwr.supercore.differential_privacy.
    add_gaussian_noise_inplace``): a Mersenne Twister shared with the whole process, which
    ``umeml-server simulate`` seeds with the config's seed when it trains a public checkpoint
    first (``train_central``): whoever knew the seed knew the noise. Here the noise is the one a
    site's DP-SGD draws (:func:`umeml.train.secure_random.os_gaussian_like`: a ChaCha20 keystream
    under a fresh key from ``os.urandom``, Opacus's construction against floating-point attacks),
    of the wrapper's own standard deviation ``noise_multiplier * clipping_norm / m``."""

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        import torch
        from flwr.supercore.differential_privacy import compute_stdv

        from umeml.train.secure_random import os_gaussian_like

        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noised = {}
        for key, array in aggregated_arrays.items():
            values = array.numpy()
            noise = os_gaussian_like(torch.empty(values.shape, dtype=torch.float64), std).numpy()  # shape only
            noised[key] = Array(np.asarray(values + noise.astype(values.dtype), dtype=values.dtype))
        log.info("central DP noise with std %.4g added (OS CSPRNG) to %d arrays", std, len(noised))
        return ArrayRecord(noised)


class SecureServerSideFixedClipping(_SecureCentralNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with :class:`_SecureCentralNoise`."""


class SecureClientSideFixedClipping(_SecureCentralNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping with :class:`_SecureCentralNoise`."""


def with_central_dp(strategy: FedAvg, fed: FederationConfig, n_sites: int):
    """``strategy`` inside Flower's fixed-clipping DP wrapper when ``fed.central_dp`` is enabled
    (umeml's subclass of it, whose noise comes from the OS's CSPRNG: :class:`_SecureCentralNoise`).

    The wrapper's noise, ``noise_multiplier * clipping_norm / sites``, is calibrated to a plain
    average of clipped updates, so the inner FedAvg/FedProx weights every site equally (the
    coordinator sets the weight on each accepted reply, see :func:`prepare_aggregation`).
    Flower's wrappers keep no accountant here; the coordinator records epsilon in the ledger.
    """
    cdp = fed.central_dp
    if not cdp.enabled:
        return strategy
    strategy.weighted_by_key = UNIFORM_WEIGHT
    from umeml.flower.pins import central_dp_problems

    problems = central_dp_problems()
    if problems:  # the secure noise would not replace Flower's: refuse rather than add the weaker one
        raise ConfigError("federation.central_dp: the installed Flower differs from the one umeml's secure noise "
                          f"is pinned to: {'; '.join(problems)}")
    wrapper = SecureServerSideFixedClipping if cdp.clipping == "server" else SecureClientSideFixedClipping
    return wrapper(strategy, cdp.noise_multiplier, cdp.clipping_norm, max(1, int(n_sites)))


def central_dp_wrapper(strategy) -> DifferentialPrivacyFixedClippingBase | None:
    """The central-DP wrapper, or None when the strategy has none."""
    return strategy if isinstance(strategy, DifferentialPrivacyFixedClippingBase) else None


def prepare_aggregation(strategy, replies: list[Message]) -> None:
    """Before ``aggregate_train``: under central DP, calibrate the noise to the number of updates
    actually averaged (sites can drop out, be rejected or have spent their local budget) and
    give every update the same weight."""
    if central_dp_wrapper(strategy) is None:
        return
    strategy.num_sampled_clients = max(1, len(replies))
    for reply in replies:
        for record in reply.content.metric_records.values():
            record[UNIFORM_WEIGHT] = 1.0


STATE_ATTRS = ("m_t", "v_t", "c_global")  # FedAdam/FedYogi moments, SCAFFOLD's c (dicts by array key)
MOMENTUM_ATTR = "momentum_vector"  # FedAvgM's server momentum (a list of arrays, in key order)


def strategy_state(strategy: FedAvg) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's mutable state that a resumed run needs (server-optimizer moments)."""
    inner = getattr(strategy, "strategy", strategy)  # inside a central-DP wrapper
    state = {a: dict(getattr(inner, a)) for a in STATE_ATTRS if getattr(inner, a, None)}
    momentum = getattr(inner, MOMENTUM_ATTR, None)
    if momentum is not None:
        state[MOMENTUM_ATTR] = {str(i): np.asarray(v) for i, v in enumerate(momentum)}
    return state


def restore_strategy_state(strategy: FedAvg, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put saved moments back so the server optimizer continues where it stopped."""
    inner = getattr(strategy, "strategy", strategy)
    for attr, value in state.items():
        if attr == MOMENTUM_ATTR:
            setattr(inner, attr, [np.asarray(value[str(i)]) for i in range(len(value))])
        else:
            setattr(inner, attr, {k: np.asarray(v) for k, v in value.items()})


class NodeSubsetGrid:
    """A view of a Grid whose node list is restricted to the training sites' nodes.

    Flower's strategies sample from ``grid.get_node_ids()``; handing them this view makes them
    sample training sites only, so held-out sites never train.
    """

    def __init__(self, grid, node_ids):
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self):
        """The training nodes that are still connected."""
        alive = set(self._grid.get_node_ids())
        return [n for n in self._node_ids if n in alive]

    def __getattr__(self, name):
        return getattr(self._grid, name)


def screen_update(reply: Message, reference: ArrayRecord, max_norm: float | None) -> str | None:
    """Why a training reply must not enter the aggregate, or None when it is acceptable.

    Rejects error replies, missing or extra keys, wrong shapes, NaN/Inf values and, when
    ``max_norm`` is set, an update whose L2 distance from the global weights exceeds it.
    """
    if reply.has_error():
        return f"error reply ({reply.error.code}: {reply.error.reason})"
    if "arrays" not in reply.content.array_records:
        return "reply carries no weights"
    arrays = reply.content.array_records["arrays"]
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"weight keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    sq = 0.0
    for key, ref in reference.items():
        got = arrays[key].numpy()
        want = ref.numpy()
        if got.shape != want.shape:
            return f"weight {key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            return f"weight {key!r} contains NaN or Inf"
        if got.dtype.kind == "f":
            sq += float(((got.astype(np.float64) - want.astype(np.float64)) ** 2).sum())
    if max_norm is not None and np.sqrt(sq) > max_norm:
        return f"update norm {np.sqrt(sq):.3g} exceeds federation.max_update_norm {max_norm:.3g}"
    return screen_control_delta(reply, reference)


def screen_control_delta(reply: Message, reference: ArrayRecord) -> str | None:
    """Why a reply's SCAFFOLD control delta (when it carries one) must not be used: keys other than
    the float weights', wrong shapes, NaN/Inf."""
    if CONTROL_DELTA not in reply.content.array_records:
        return None
    delta = reply.content.array_records[CONTROL_DELTA]
    want = {k: a.numpy() for k, a in reference.items() if a.numpy().dtype.kind == "f"}
    if set(delta.keys()) != set(want):
        return f"{CONTROL_DELTA}: keys differ from the float weights' ({len(delta.keys())} vs {len(want)})"
    for key, ref in want.items():
        got = delta[key].numpy()
        if got.shape != ref.shape:
            return f"{CONTROL_DELTA}: {key!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if not np.isfinite(got).all():
            return f"{CONTROL_DELTA}: {key!r} contains NaN or Inf"
    return None
