"""Named parts of a model: what trains (``train.trainable``), what a site sends back, and a
checkpoint's fit to an architecture.

- ``trainable``: ``"all"``, ``"heads"`` (the task heads), ``"decoder"`` (everything that reads
  the fused tokens: the ``decoder`` layers, ``norm``, ``fusion`` and ``heads``, those the model
  has) or a list of module names (dotted, as in ``model.named_modules()``). Frozen parameters
  have ``requires_grad`` False: no gradients, no per-sample gradients under Opacus, no noise.
- The **update keys** are the weights a site sends back after training: the trainable ones
  (and the buffers of trainable modules), minus those matching ``federation.keep_local``
  (fnmatch patterns on weight names), which each site keeps for itself. The coordinator keeps
  every other weight of its global model as it is (:func:`merge_update`).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from umeml.errors import UmemlError

__all__ = ["CheckpointMismatch", "PartError", "apply_trainable", "check_state_fits", "keep_local_keys",
           "merge_update", "trainable_modules", "update_keys"]

DECODER_PARTS = ("decoder", "norm", "fusion", "heads")


class PartError(UmemlError):
    """``train.trainable`` or ``federation.keep_local`` names nothing in the model."""


class CheckpointMismatch(UmemlError):
    """A checkpoint's tensors do not fit the architecture it should initialise."""


def trainable_modules(model: nn.Module, trainable: str | tuple[str, ...]) -> tuple[str, ...]:
    """Module names that train under ``trainable`` (``("",)``: the whole model)."""
    names = dict(model.named_modules())
    if trainable == "all":
        return ("",)
    if trainable == "heads":
        wanted = ("heads",)
    elif trainable == "decoder":
        wanted = tuple(n for n in DECODER_PARTS if n in names)
    else:
        wanted = tuple(trainable)
    missing = [n for n in wanted if n not in names]
    if missing or not wanted:
        top = ", ".join(n for n, _ in model.named_children())
        raise PartError(f"train.trainable: {type(model).__name__} has no module(s) {missing or list(wanted)} "
                        f"(its top-level modules: {top})")
    return wanted


def _under(key: str, modules: tuple[str, ...]) -> bool:
    return any(m == "" or key == m or key.startswith(m + ".") for m in modules)


def apply_trainable(model: nn.Module, trainable: str | tuple[str, ...]) -> list[str]:
    """Freeze every parameter outside the trainable modules; returns the trainable names."""
    modules = trainable_modules(model, trainable)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(_under(name, modules))
        if p.requires_grad:
            names.append(name)
    return names


def keep_local_keys(keys, patterns: tuple[str, ...]) -> list[str]:
    """The weight names matching any ``federation.keep_local`` pattern."""
    return [k for k in keys if any(fnmatchcase(k, p) for p in patterns)]


def update_keys(model: nn.Module, trainable: str | tuple[str, ...], keep_local: tuple[str, ...] = ()) -> list[str]:
    """The state-dict keys a training site sends back, in state-dict order.

    Raises :class:`PartError` when a keep_local pattern matches no weight (a typo would send
    what was meant to stay) or when nothing would be sent.
    """
    modules = trainable_modules(model, trainable)
    keys = list(model.state_dict())
    unmatched = [p for p in keep_local if not keep_local_keys(keys, (p,))]
    if unmatched:
        raise PartError(f"federation.keep_local: pattern(s) {unmatched} match no weight of "
                        f"{type(model).__name__} (e.g. {keys[:3]})")
    local = set(keep_local_keys(keys, keep_local))
    out = [k for k in keys if _under(k, modules) and k not in local]
    if not out:
        raise PartError("train.trainable and federation.keep_local leave no weight to send back")
    return out


def merge_update(global_state: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global state with the updated tensors replaced, every other tensor kept as it is."""
    return {k: (update[k].to(v.dtype) if k in update else v) for k, v in global_state.items()}


def _listed(items: list[str], sep: str, most: int = 12) -> str:
    more = f"{sep}... ({len(items) - most} more)" if len(items) > most else ""
    return f"{len(items)} tensor(s): " + sep.join(items[:most]) + more


def check_state_fits(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise :class:`CheckpointMismatch` listing every tensor that is missing, unexpected or of
    another shape when ``state`` is loaded into ``model``."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [f"{k}: checkpoint {got[k]}, model {want[k]}" for k in want if k in got and got[k] != want[k]]
    if not (missing or extra or shapes):
        return
    lines = ([f"missing from the checkpoint: {_listed(missing, ', ')}"] if missing else []) + \
            ([f"not in the model: {_listed(extra, ', ')}"] if extra else []) + \
            ([f"shape differs: {_listed(shapes, '; ')}"] if shapes else [])
    raise CheckpointMismatch(f"{source}: the checkpoint does not fit the configured model "
                             f"({type(model).__name__}):\n  - " + "\n  - ".join(lines))
