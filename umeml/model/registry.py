"""Registry of models by name (timm style): one name, one builder; a duplicate name is an error.

Configurations choose a model by its registered name (``model.name``), never by a dotted import
path. Every builder has the signature ``(cfg, feature_dim, group_sizes, heads) -> nn.Module``
and returns a module whose ``forward(features, patch_mask, genomics, has_path, has_genomics,
coords=None)`` gives a :class:`~umeml.model.blocks.ModelOutput` (``Batch.model_inputs()`` in that
order). A model that reads ``coords`` (``model.spatial_context``) says so with a class attribute
``supports_spatial_context = True``; asking another model for spatial context is a config error.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from umeml.config import ModelConfig, config_to_dict
from umeml.errors import ConfigError
from umeml.registry import Registry

__all__ = ["available_models", "build_model", "register_model", "supports_spatial_context"]

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable:
    """Class/function decorator registering a model builder under ``name``.

    Raises ``ValueError`` if ``name`` is already taken (two models must never share a name:
    a checkpoint or config would silently pick one of them).
    """
    return _MODELS.register(name)


def available_models() -> tuple[str, ...]:
    """Names of the registered models, sorted."""
    return _MODELS.names()


def supports_spatial_context(name: str) -> bool:
    """Whether the registered model ``name`` reads ``coords`` with ``model.spatial_context``."""
    return name in _MODELS and bool(getattr(_MODELS[name], "supports_spatial_context", False))


def build_model(
    cfg: ModelConfig, feature_dim: int, group_sizes: tuple[int, ...], heads: dict[str, int]
) -> nn.Module:
    """Build the model ``cfg.name`` for patch features of size ``feature_dim``, gene groups of
    sizes ``group_sizes`` (their columns concatenated in ``Batch.genomics``) and task ``heads``
    (task -> number of outputs, e.g. ``{"grade": 3, "survival": 4}``).

    The returned module carries ``build_spec`` (plain data) so that
    :func:`umeml.model.save_checkpoint` can store everything needed to rebuild it.
    """
    if cfg.name not in _MODELS:
        raise ConfigError(
            f"model.name: unknown model {cfg.name!r}; available: {', '.join(available_models())}"
        )
    if not isinstance(feature_dim, int) or feature_dim < 0:
        raise ValueError(f"feature_dim must be a non-negative int, got {feature_dim!r}")
    group_sizes = tuple(int(g) for g in group_sizes)
    if any(g < 1 for g in group_sizes):
        raise ValueError(f"every gene group needs at least one feature, got sizes {group_sizes}")
    heads = {str(k): int(v) for k, v in heads.items()}
    if cfg.spatial_context != "none" and not supports_spatial_context(cfg.name):
        raise ConfigError(f"model.spatial_context: {cfg.spatial_context!r} is not implemented for model "
                          f"{cfg.name!r} (use 'none', or model.name umeml)")
    model = _MODELS[cfg.name](cfg, feature_dim, group_sizes, heads)
    model.build_spec = {
        "config": config_to_dict(cfg),
        "feature_dim": feature_dim,
        "group_sizes": list(group_sizes),
        "heads": dict(heads),
    }
    return model
