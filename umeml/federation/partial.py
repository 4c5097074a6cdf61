"""Partial updates: which weights travel from a site to the coordinator after training.

A site sends only its update keys (:func:`umeml.model.parts.update_keys`: the trainable
weights of ``train.trainable`` minus ``federation.keep_local``); frozen weights did not change
and keep-local weights stay at the site. The coordinator screens a reply against exactly
that subset and merges it into its full global model, keeping every other weight as it is.
Both sides derive the keys from the experiment config and the federation's preprocessing, so
they always agree.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from umeml.config import ExperimentConfig, config_from_dict, config_to_dict
from umeml.federation.protocol import Preprocessing
from umeml.model.parts import keep_local_keys, update_keys
from umeml.model.registry import build_model

__all__ = ["keep_local_names", "outgoing_update", "sent_keys"]


@lru_cache(maxsize=8)
def _keys(cfg_json: str, prep_json: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    import json

    cfg = config_from_dict(json.loads(cfg_json), "experiment")
    prep = Preprocessing.from_json(prep_json)
    model = build_model(cfg.model, prep.feature_dim, tuple(prep.group_sizes), prep.heads)
    sent = tuple(update_keys(model, cfg.train.trainable, cfg.federation.keep_local))
    local = tuple(keep_local_keys(list(model.state_dict()), cfg.federation.keep_local))
    return sent, local


def _args(cfg: ExperimentConfig, prep: Preprocessing) -> tuple[str, str]:
    import json

    return json.dumps(config_to_dict(cfg), sort_keys=True), prep.to_json()


def sent_keys(cfg: ExperimentConfig, prep: Preprocessing) -> tuple[str, ...]:
    """The weight names a training site sends back (in state-dict order)."""
    return _keys(*_args(cfg, prep))[0]


def keep_local_names(cfg: ExperimentConfig, prep: Preprocessing) -> tuple[str, ...]:
    """The weight names each site keeps for itself (``federation.keep_local``)."""
    return _keys(*_args(cfg, prep))[1]


def outgoing_update(state: dict[str, torch.Tensor], cfg: ExperimentConfig, prep: Preprocessing) -> dict[str, torch.Tensor]:
    """The part of a site's trained state that leaves the site."""
    return {k: state[k] for k in sent_keys(cfg, prep)}
