"""A site's own copy of its ``federation.keep_local`` weights, kept in the ClientApp's
``Context.state`` across rounds (Flower keeps one context per node and run, in simulation and
on a SuperNode), never sent to the coordinator.

Before training (and evaluating) the site puts its own copy over the global values of those
weights; after training it stores the new values. A site that has not trained yet (or a
held-out site) uses the global values.
"""

from __future__ import annotations

import torch
from flwr.app import Context

from umeml.config import ExperimentConfig
from umeml.federation.partial import keep_local_names
from umeml.federation.protocol import Preprocessing
from umeml.flower.records import arrays_from_state, state_from_arrays

RECORD = "umeml-keep-local"


def with_local_copies(context: Context, received: dict[str, torch.Tensor], cfg: ExperimentConfig,
                      prep: Preprocessing) -> dict[str, torch.Tensor]:
    """``received`` with the site's own keep-local weights in place of the global ones."""
    names = keep_local_names(cfg, prep)
    if not names or RECORD not in context.state.array_records:
        return received
    own = state_from_arrays(context.state.array_records[RECORD], received)
    return {k: (own[k] if k in own and own[k].shape == v.shape else v) for k, v in received.items()}


def remember_local_copies(context: Context, trained: dict[str, torch.Tensor], cfg: ExperimentConfig,
                          prep: Preprocessing) -> None:
    """Store the keep-local weights of ``trained`` in the node's context for the next round."""
    names = keep_local_names(cfg, prep)
    if names:
        context.state[RECORD] = arrays_from_state({k: trained[k] for k in names})
