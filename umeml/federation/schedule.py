"""Round-level optimisation settings of local training: the learning-rate factor of each round and
the site's optimizer state carried between rounds.

Centralized training decays its learning rate over epochs (warm-up + cosine); a federation whose
sites restart at a constant rate every round keeps taking full-size local steps at the end and
ends noisier than pooling. The coordinator therefore computes one factor per round and sends it
in the round's config (``lr-scale``); sites multiply ``train.lr`` by it. Nothing here knows Flower.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from umeml.config import FederationConfig
from umeml.rundir import atomic_write

log = logging.getLogger("umeml.site")

LR_SCALE_KEY = "lr-scale"  # the round config's key of the learning-rate factor


def round_lr_factor(fed: FederationConfig, rnd: int) -> float:
    """The learning-rate factor of round ``rnd`` (1-based) of ``fed.rounds``.

    ``constant``: 1. ``cosine``: linear warm-up ``rnd / (warmup_rounds + 1)`` over the first
    ``warmup_rounds`` rounds, then ``0.5 (1 + cos(pi p))`` with p = (rnd - 1 - warmup) / (rounds -
    warmup) going from 0 towards 1, the per-round analogue of the centralized schedule
    (:func:`umeml.train.loop.cosine_with_warmup`, whose step is the round here). The last round's
    factor stays above 0, so every round trains.
    """
    if rnd < 1:
        raise ValueError(f"round {rnd}: rounds are numbered from 1")
    if fed.lr_schedule == "constant":
        return 1.0
    warmup = min(fed.warmup_rounds, max(fed.rounds - 1, 0))
    if rnd <= warmup:
        return rnd / (warmup + 1)
    progress = (rnd - 1 - warmup) / max(1, fed.rounds - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def round_settings(fed: FederationConfig, rnd: int) -> dict:
    """What the coordinator adds to round ``rnd``'s training config (the learning-rate factor)."""
    return {LR_SCALE_KEY: float(round_lr_factor(fed, rnd))}


def site_state_file(state_dir: str | Path | None, site_id: str, experiment: str, kind: str, needed_by: str) -> Path:
    """``<state_dir>/<kind>-<experiment>.pt``: a file a site keeps between rounds (never sent), the
    experiment name made safe for a file name; no state dir is an error naming what needs one."""
    if state_dir is None:
        raise RuntimeError(f"site {site_id}: {needed_by} needs a state dir "
                           "(state_dir in the site file; SimulatedSites.state_root in simulation)")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return Path(state_dir) / f"{kind}-{safe}.pt"


class OptimizerStore:
    """A site's optimizer state kept between rounds (``federation.optimizer_state: site``).

    Kept in the site's state dir (``optimizer-<experiment>.pt``), never sent: momentum buffers
    or Adam moments are per-patient-gradient aggregates of this site only. Round 1 always starts
    fresh (a new run), so a file of an earlier run with the same experiment name is replaced; a
    resumed run continues with the state saved after the last round the site trained.
    """

    def __init__(self, state_dir: str | Path | None, site_id: str, experiment: str):
        self.path = site_state_file(state_dir, site_id, experiment, "optimizer", "federation.optimizer_state 'site'")

    def load_into(self, optimizer: torch.optim.Optimizer, server_round: int) -> bool:
        """Restore the saved state (moments) into ``optimizer``, keeping its current learning
        rates (this round's factor); returns whether a state was restored."""
        if server_round <= 1 or not self.path.is_file():
            return False
        saved = torch.load(self.path, weights_only=True)
        if int(saved["round"]) >= server_round:  # a rerun of a round: the saved state is from its future
            log.warning("optimizer state in %s is from round %s >= %d; starting fresh", self.path,
                        saved["round"], server_round)
            return False
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(saved["optimizer"])
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        return True

    def save(self, optimizer: torch.optim.Optimizer, server_round: int) -> None:
        """Keep the optimizer's state after round ``server_round`` (atomic replace)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"round": int(server_round), "optimizer": optimizer.state_dict()}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))
