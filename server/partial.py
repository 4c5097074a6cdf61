"""The coordinator's side of partial updates (see :mod:`umeml.federation.partial`): screen a
site's reply against exactly the expected subset of weights, and complete it with the global
values of the rest before Flower's strategy aggregates (every strategy then sees full,
consistent records; the weights no site sent come out of the aggregate unchanged, and
:func:`merge_aggregate` puts their exact global values back)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from umeml.model.parts import merge_update


def expected_subset(arrays: ArrayRecord, keys: tuple[str, ...]) -> ArrayRecord:
    """The global arrays restricted to the keys a site must send (the reference for screening)."""
    if len(keys) == len(arrays):
        return arrays
    return ArrayRecord({k: arrays[k] for k in keys})


def complete_replies(replies: list[Message], arrays: ArrayRecord) -> list[Message]:
    """Copies of the accepted replies, each with the global value of every weight it did not
    send, in the global key order (a partial update changes only what it carries). The
    received messages stay as they came (the run's records and audits see what was sent)."""
    out = []
    for reply in replies:
        got = reply.content.array_records["arrays"]
        if len(got) == len(arrays):
            out.append(reply)
            continue
        content = RecordDict({name: record for name, record in reply.content.items() if name != "arrays"})
        content["arrays"] = ArrayRecord({k: (got[k] if k in got else arrays[k]) for k in arrays})
        # Flower 1.42's Message(metadata=..., content=...) form, as its make_message uses
        out.append(Message(metadata=reply.metadata, content=content))
    return out


def merge_aggregate(global_state: dict[str, torch.Tensor], aggregated: dict[str, torch.Tensor],
                    keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The new global state: the aggregate of the sent keys, the old global values elsewhere."""
    return merge_update(global_state, {k: aggregated[k] for k in keys})
