"""Weights as Flower ArrayRecords, shared by the coordinator and the sites' ClientApp."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def arrays_from_state(state: dict[str, torch.Tensor], fp16: bool = False) -> ArrayRecord:
    """ArrayRecord of a state dict; float32 tensors optionally sent as float16 (half the bytes)."""
    out = {}
    for key, tensor in state.items():
        value = tensor.detach().cpu().numpy()
        if fp16 and value.dtype == np.float32:
            value = value.astype(np.float16)
        out[key] = Array(np.ascontiguousarray(value))
    return ArrayRecord(out)


def state_from_arrays(arrays: ArrayRecord, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict from an ArrayRecord, in the dtypes of ``like`` (else float16 widened to float32).

    Flower's FedAdam returns float64 arrays and fp16 transfers arrive as float16; both are cast
    back so the model's own dtypes never drift.
    """
    state = {}
    for key, array in arrays.items():
        value = np.ascontiguousarray(array.numpy())
        tensor = torch.from_numpy(value)
        if like is not None:
            tensor = tensor.to(like[key].dtype)
        elif value.dtype == np.float16:
            tensor = tensor.float()
        state[key] = tensor
    return state
