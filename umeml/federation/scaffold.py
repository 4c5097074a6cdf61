"""SCAFFOLD control variates (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020), the parts free of Flower.

Client drift: at a label-skewed site (TCGA GBM-LGG: GBM and LGG come from different tissue
source sites) local steps follow the site's own gradient, not the federation's. SCAFFOLD keeps a
server control variate ``c`` (an estimate of the federation's gradient) and one per site,
``c_i`` (the site's), and corrects every local step by ``c - c_i``::

    y <- y - lr * (g_i(y) + c - c_i)                                   (local step)
    c_i+ = c_i - c + (x - y) / (K * lr)                                (option II)
    c    <- c + |S| / N * mean_i (c_i+ - c_i)                          (server)

with ``x`` the global weights the round started from and ``K`` local steps. umeml's local
optimizer is SGD with heavy-ball momentum ``beta`` (reset every round): with a constant gradient
g it moves ``lr * g * S`` in K steps, ``S = sum_{t=1..K} (1 - beta^t) / (1 - beta)``, so option
II's ``K * lr`` becomes ``S * lr`` (``S = K`` for ``beta = 0``, the paper's plain SGD).

What travels: ``c`` down with the weights (record :data:`SERVER_CONTROL`), ``c_i+ - c_i`` up with
the update (record :data:`CONTROL_DELTA`), both with the weights' keys and shapes. ``c_i`` stays in
the site's state dir. The site's control variate is an exact function of its patients' gradients,
outside any local-DP guarantee, so SCAFFOLD is refused with local DP (``umeml.config``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from umeml.federation.schedule import site_state_file
from umeml.rundir import atomic_write

log = logging.getLogger(__name__)

SERVER_CONTROL = "scaffold-c"  # coordinator -> site: the server control variate c
CONTROL_DELTA = "scaffold-dc"  # site -> coordinator: c_i+ - c_i


def momentum_steps(steps: int, momentum: float) -> float:
    """``S = sum_{t=1..K} (1 - beta^t) / (1 - beta)``: how many plain SGD steps K heavy-ball
    steps from a zero buffer are worth under a constant gradient (K for ``beta`` 0)."""
    if momentum == 0.0:
        return float(steps)
    return float(sum((1.0 - momentum ** t) / (1.0 - momentum) for t in range(1, steps + 1)))


def updated_control(c_i: dict, c: dict, start: dict, end: dict, steps: int, lr: float,
                    momentum: float = 0.0) -> dict[str, torch.Tensor]:
    """Option II: ``c_i+ = c_i - c + (x - y) / (S * lr)`` per key (``x`` = ``start``, ``y`` =
    ``end``, ``S`` = :func:`momentum_steps`); ``c_i`` unchanged when no step was taken."""
    if steps <= 0 or lr <= 0:
        return {k: v.clone() for k, v in c_i.items()}
    scale = 1.0 / (momentum_steps(steps, momentum) * lr)
    return {k: c_i[k] - c[k] + (start[k].float() - end[k].float()) * scale for k in c_i}


def correction_term(model: torch.nn.Module, c: dict, c_i: dict):
    """A loss term whose gradient is ``c - c_i`` for every corrected parameter: ``sum <c - c_i, p>``
    (added to each local step's loss, so the optimizer sees ``g + c - c_i``)."""
    diffs = {name: (c[name] - c_i[name]).detach() for name in c_i}
    params = [(p, diffs[name]) for name, p in model.named_parameters() if name in diffs]

    def term(_model):
        return sum((p * d.to(device=p.device, dtype=p.dtype)).sum() for p, d in params)

    return term


def server_control_update(c: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]], weights: list[float],
                          participation: float) -> dict[str, np.ndarray]:
    """``c + participation * sum_i w_i dc_i`` with the weights normalised (the same weights as the
    aggregate of the updates); ``participation`` = |S| / N."""
    if not deltas:
        return c
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(deltas), 1.0 / len(deltas))
    return {k: (c[k] + participation * sum(wi * d[k] for wi, d in zip(w, deltas))).astype(c[k].dtype) for k in c}


@dataclass
class ControlExchange:
    """One round's control variates at a site: ``server`` = c as received (parameter name ->
    tensor); ``delta`` = c_i+ - c_i, set by the site's training (None until it trained)."""

    server: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor] | None = None


class ControlVariateStore:
    """A site's control variate ``c_i`` between rounds, in its state dir (``scaffold-<experiment>.pt``),
    never sent. Round 1 starts from zero (a new run replaces an earlier run's file of the same
    experiment); a rerun of a round starts from zero too, with a warning (the file is from its future)."""

    def __init__(self, state_dir: str | Path | None, site_id: str, experiment: str):
        self.path = site_state_file(state_dir, site_id, experiment, "scaffold",
                                    "federation.strategy 'scaffold' (the site's control variate)")

    def load(self, server_round: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``c_i`` saved after an earlier round, or zeros shaped like ``like``."""
        zeros = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in like.items()}
        if server_round <= 1 or not self.path.is_file():
            return zeros
        saved = torch.load(self.path, weights_only=True)
        if int(saved["round"]) >= server_round or set(saved["c_i"]) != set(like):
            log.warning("control variate in %s is from round %s (or of other weights); starting from zero",
                        self.path, saved["round"])
            return zeros
        return saved["c_i"]

    def save(self, c_i: dict[str, torch.Tensor], server_round: int) -> None:
        """Keep ``c_i`` after round ``server_round`` (atomic replace)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"round": int(server_round), "c_i": {k: v.detach().cpu() for k, v in c_i.items()}}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))


class ScaffoldRound:
    """A site's SCAFFOLD bookkeeping for one round of local training: the correction term for
    the loss (:attr:`term`), then :meth:`finish` computes ``c_i+``, keeps it and fills
    ``exchange.delta`` (zeros for received keys that are not trained parameters)."""

    def __init__(self, store: ControlVariateStore, exchange: ControlExchange, model: torch.nn.Module,
                 server_round: int):
        self.store, self.exchange, self.round = store, exchange, server_round
        self.start = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(self.start) - set(exchange.server))
        if missing:
            raise ValueError(f"the server control variate ({SERVER_CONTROL}) lacks trained weights {missing[:3]}")
        self.server = {n: exchange.server[n].float().cpu() for n in self.start}
        self.c_i = store.load(server_round, self.start)
        self.term = correction_term(model, self.server, self.c_i)

    def finish(self, model: torch.nn.Module, steps: int, lr: float, momentum: float) -> None:
        """Option II after ``steps`` optimizer steps at ``lr`` (heavy-ball ``momentum``)."""
        end = {n: p.detach().cpu() for n, p in model.named_parameters() if n in self.start}
        new = updated_control(self.c_i, self.server, self.start, end, steps, lr, momentum)
        self.store.save(new, self.round)
        self.exchange.delta = {k: (new[k] - self.c_i[k]) if k in new else torch.zeros_like(v, dtype=torch.float32)
                               for k, v in self.exchange.server.items()}
