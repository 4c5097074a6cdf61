"""Model checkpoints: weights plus everything needed to rebuild the model, loadable with
``torch.load(weights_only=True)`` (plain dicts, lists, strings, numbers and tensors only).

Layout of the saved dict::

    {"format": "umeml.model", "version": 1,
     "model": {"config": <ModelConfig as dict>, "feature_dim": int,
               "group_sizes": [int, ...], "heads": {task: n_out}},
     "state_dict": {name: tensor}, "meta": {...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from umeml.config import config_from_dict
from umeml.model.parts import CheckpointMismatch, check_state_fits
from umeml.model.registry import build_model
from umeml.rundir import atomic_write

__all__ = ["init_from_checkpoint", "load", "save_checkpoint", "unwrap_model"]

FORMAT = "umeml.model"
VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside wrappers (Opacus ``GradSampleModule``, DDP, ``torch.compile``)."""
    while True:
        inner = getattr(model, "_module", None) or getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_plain(value: Any, where: str) -> None:
    """Reject anything ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights-only checkpoint")


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict | None = None) -> Path:
    """Write weights + build spec + ``meta`` to ``path`` atomically; returns the path.

    ``model`` must come from :func:`umeml.model.build_model` (it carries ``build_spec``);
    wrappers such as Opacus's ``GradSampleModule`` are unwrapped first.
    """
    model = unwrap_model(model)
    spec = getattr(model, "build_spec", None)
    if spec is None:
        raise ValueError("save_checkpoint: the model was not built by umeml.model.build_model")
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    # a crash mid-write never leaves a truncated checkpoint behind
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _read(path: Path, map_location) -> dict:
    if not path.is_file():
        raise CheckpointMismatch(f"{path}: no such checkpoint file")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path}: not a umeml model checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointMismatch(f"{path}: checkpoint version {payload.get('version')!r} is not supported "
                                 f"(expected {VERSION})")
    return payload


def checkpoint_meta(path: str | Path) -> dict:
    """The meta of the checkpoint at ``path`` (what ``umeml train`` recorded), without building its model."""
    return dict(_read(Path(path), "cpu").get("meta", {}))


def init_from_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load the weights of the checkpoint at ``path`` into ``model`` (the configured architecture,
    e.g. a public-cohort model for private fine-tuning); returns the checkpoint's meta.

    Raises :class:`~umeml.model.parts.CheckpointMismatch` naming every missing, unexpected or
    differently shaped tensor (and the model names when they differ) before anything is loaded.
    """
    path = Path(path)
    payload = _read(path, "cpu")
    state = payload["state_dict"]
    try:
        check_state_fits(state, model, str(path))
    except CheckpointMismatch as err:
        saved = payload.get("model", {}).get("config", {}).get("name")
        built = getattr(model, "build_spec", {}).get("config", {}).get("name")
        if saved and built and saved != built:
            raise CheckpointMismatch(f"{err} (checkpoint model {saved!r}, configured {built!r})") from None
        raise
    model.load_state_dict(state)
    return dict(payload.get("meta", {}))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved at ``path``; returns ``(model in eval mode, meta)``."""
    path = Path(path)
    payload = _read(path, map_location)
    spec = payload["model"]
    cfg = config_from_dict({"model": spec["config"]}, source=str(path)).model
    model = build_model(cfg, int(spec["feature_dim"]), tuple(spec["group_sizes"]), dict(spec["heads"]))
    model.load_state_dict(payload["state_dict"])
    model.to(map_location)
    model.eval()
    return model, payload.get("meta", {})
