"""Models: UMEML and the baselines (ABMIL, SNN, late fusion, linear), a registry, checkpoints.

Importing this package registers every model; build one with :func:`build_model`.
"""

from umeml.model.baselines import ABMIL, SNN, LateFusion, LinearBaseline
from umeml.model.blocks import ModelOutput, register_dp_grad_samplers
from umeml.model.io import load, save_checkpoint, unwrap_model
from umeml.model.modularity import dense_modularity_loss, modularity_loss, soft_assignments
from umeml.model.registry import available_models, build_model, register_model
from umeml.model.umeml_model import UMEML

__all__ = [
    "ABMIL",
    "LateFusion",
    "LinearBaseline",
    "ModelOutput",
    "SNN",
    "UMEML",
    "available_models",
    "build_model",
    "dense_modularity_loss",
    "load",
    "modularity_loss",
    "register_dp_grad_samplers",
    "register_model",
    "save_checkpoint",
    "soft_assignments",
    "unwrap_model",
]
