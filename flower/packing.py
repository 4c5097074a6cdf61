"""Model weights on the wire as one array per dtype instead of one Flower object per tensor.

Flower 1.42 sends a message as a tree of objects, each pushed and pulled with an HTTP request of
its own (and stored as a row of the SuperLink's SQLite database): an ArrayRecord of the demo
model's 112 tensors is about 170 objects (an ``Array`` and its ``ArrayChunk`` per tensor), and a
round moves it over four hops (ServerApp -> SuperLink -> SuperNode -> ClientApp and back) for
every site. :func:`pack` turns such a record into ``umeml.layout`` (the keys, dtypes and shapes,
as UTF-8 JSON in a uint8 array) and one flat array per dtype (``umeml.flat.float32`` ...):
half a dozen objects whatever the model. :func:`unpack` gives back the record exactly (same
keys in the same order, same dtypes, shapes and bytes).

Packing happens only at the transport boundary: the coordinator's grid packs what it sends and
unpacks what it receives (:class:`umeml.server.grid.PackingGrid`), and a site's ClientApp
unpacks a packed message before its handlers run and packs its reply only when the message came
packed (:func:`packing_mod`, the ClientApp's mod in :mod:`umeml.client.app`). The coordinator's screening, partial updates,
strategies and the sites' handlers see per-tensor records as before.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

LAYOUT = "umeml.layout"
FLAT = "umeml.flat."
RECORD = "arrays"  # the content record that carries the weights, in both directions


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is :func:`pack`'s form."""
    return LAYOUT in record


def pack(record: ArrayRecord) -> ArrayRecord:
    """``record`` as its layout and one flat array per dtype (a packed record is returned as is)."""
    if is_packed(record):
        return record
    layout, parts = [], {}
    for key, array in record.items():
        value = array.numpy()
        layout.append([key, value.dtype.str, list(value.shape)])
        parts.setdefault(value.dtype.str, []).append(value.reshape(-1))
    out = {LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy())}
    for dtype, values in parts.items():
        out[FLAT + dtype] = Array(np.concatenate(values))
    return ArrayRecord(out)


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The per-tensor record that :func:`pack` packed (an unpacked record is returned as is).
    A ValueError when the flat arrays do not hold what the layout says."""
    if not is_packed(record):
        return record
    layout = json.loads(record[LAYOUT].numpy().tobytes().decode())
    flats = {key[len(FLAT):]: record[key].numpy() for key in record if key.startswith(FLAT)}
    offsets = dict.fromkeys(flats, 0)
    out = {}
    for key, dtype, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        flat = flats.get(dtype)
        if flat is None or flat.dtype.str != dtype or offsets[dtype] + n > flat.size:
            raise ValueError(f"packed weights: {key} ({dtype}, {shape}) is not in the flat arrays")
        out[key] = Array(flat[offsets[dtype]:offsets[dtype] + n].reshape(shape).copy())  # 0-d stays 0-d
        offsets[dtype] += n
    if any(offsets[d] != flats[d].size for d in flats):
        raise ValueError("packed weights: the flat arrays hold more values than the layout names")
    return ArrayRecord(out)


def _with_record(message: Message, record: ArrayRecord) -> Message:
    """``message`` with a new content holding ``record`` as its weights (the old content, which
    other messages of a wave may share, is left alone)."""
    content = RecordDict(dict(message.content.items()))
    content[RECORD] = record
    message.content = content
    return message


def pack_message(message: Message, packed: dict[int, ArrayRecord] | None = None) -> Message:
    """``message`` with its weights record packed (a message without one is unchanged);
    ``packed`` caches the packed form by record, so the messages of a wave, which share the
    global weights, pack them once."""
    if not message.has_content() or RECORD not in message.content.array_records:
        return message
    record = message.content.array_records[RECORD]
    if is_packed(record):
        return message
    cache = {} if packed is None else packed
    if id(record) not in cache:
        cache[id(record)] = pack(record)
    return _with_record(message, cache[id(record)])


def unpacked(message: Message) -> Message:
    """``message`` with its weights per tensor: a copy (same metadata) when they came packed, the
    message itself otherwise; the message as received is left alone."""
    if not (message.has_content() and RECORD in message.content.array_records
            and is_packed(message.content.array_records[RECORD])):
        return message
    content = RecordDict(dict(message.content.items()))
    content[RECORD] = unpack(content.array_records[RECORD])
    return Message(content, metadata=message.metadata)


def packing_mod(message: Message, context, call_next) -> Message:
    """A ClientApp mod: the handlers see the weights per tensor; the reply travels packed when
    the message came packed (a coordinator that does not pack gets per-tensor replies, as before)."""
    plain = unpacked(message)
    reply = call_next(plain, context)
    return reply if plain is message else pack_message(reply)
