"""Weights on the wire packed as one array per dtype (umeml.flower.packing): exact round trip,
few Flower objects per message, and the grid/ClientApp pair that packs only at the transport."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from umeml.flower.packing import LAYOUT, is_packed, pack, pack_message, packing_mod, unpack, unpacked
from umeml.flower.records import arrays_from_state
from umeml.server.grid import PackingGrid


def _record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({
        "b.weight": Array(rng.normal(size=(3, 4)).astype(np.float32)),
        "a.bias": Array(rng.normal(size=(4,)).astype(np.float32)),
        "half": Array(rng.normal(size=(2, 2)).astype(np.float16)),
        "steps": Array(np.array([7, 9], dtype=np.int64)),
        "scalar": Array(np.array(1.5, dtype=np.float32)),
        "empty": Array(np.zeros((0, 3), dtype=np.float32)),
    })


def test_packing_gives_back_every_tensor_exactly_in_its_order_dtype_and_shape():
    record = _record()
    packed = pack(record)
    assert is_packed(packed) and sorted(packed) == sorted([LAYOUT, "umeml.flat.<f2", "umeml.flat.<f4", "umeml.flat.<i8"])
    back = unpack(packed)
    assert list(back) == list(record)
    for key in record:
        a, b = record[key].numpy(), back[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
    assert pack(packed) is packed and unpack(record) is record  # idempotent


def test_a_packed_record_that_does_not_match_its_layout_is_refused():
    packed = pack(_record())
    short = ArrayRecord({k: (Array(packed[k].numpy()[:-1]) if k == "umeml.flat.<f4" else packed[k]) for k in packed})
    with pytest.raises(ValueError, match="is not in the flat arrays"):
        unpack(short)
    longer = ArrayRecord({k: (Array(np.concatenate([packed[k].numpy(), [1.0]]).astype(np.float32))
                              if k == "umeml.flat.<f4" else packed[k]) for k in packed})
    with pytest.raises(ValueError, match="more values"):
        unpack(longer)


def _model_state() -> dict:
    torch.manual_seed(0)
    return {f"layer{i}.{p}": torch.randn(16, 16) if p == "weight" else torch.randn(16)
            for i in range(50) for p in ("weight", "bias")}


def test_a_packed_message_is_a_handful_of_flower_objects_whatever_the_model():
    # each object is one HTTP request per hop and one SQLite row at the SuperLink
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    record = arrays_from_state(_model_state())

    def objects(arrays):
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=2,
                      message_type=MessageType.TRAIN)
        return len(get_all_nested_objects(msg))

    assert objects(record) > 100 and objects(pack(record)) <= 8


def _train_message(arrays: ArrayRecord, node: int) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"x": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def test_the_grid_packs_a_wave_once_and_the_site_mirrors_what_it_got():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    record = _record()
    content = RecordDict({"arrays": record, "config": ConfigRecord({"x": 1})})  # shared, as a strategy builds it
    wave = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (2, 3)]
    seen = []

    def handler(msg, context):  # a ClientApp handler: sees per-tensor weights, replies per tensor
        seen.append(list(msg.content["arrays"]))
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    class Wire:  # delivers through the site's mod; what travels is recorded
        sent, received = [], []

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for m in messages:
                self.sent.append(m.content["arrays"])
                delivered = Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type)
                replies.append(packing_mod(delivered, None, handler))
                self.received.append(replies[-1].content["arrays"])
            return replies

    wire = Wire()
    replies = PackingGrid(wire).send_and_receive(wave)
    assert all(is_packed(r) for r in wire.sent + wire.received)
    assert wire.sent[0] is wire.sent[1]  # packed once for the wave
    assert content["arrays"] is record  # the coordinator's own record is left alone
    assert seen == [list(record)] * 2
    assert all(list(r.content["arrays"]) == list(record) for r in replies)
    # a coordinator that does not pack gets per-tensor replies (tests' grids, older coordinators)
    plain = packing_mod(_train_message(record, 2), None, handler)
    assert not is_packed(plain.content["arrays"])


def test_messages_without_weights_pass_unchanged():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=2, message_type=MessageType.QUERY)
    assert pack_message(msg) is msg and unpacked(msg) is msg


def test_a_federation_over_packed_messages_ends_with_the_same_weights(tiny_cohort_dir, tmp_path, one_torch_thread):
    from umeml.client.app import SimulatedSites, build_client_app
    from umeml.data.source import CohortSource
    from umeml.server.coordinator import Coordinator

    from fed_helpers import LocalGrid, tiny_experiment

    cfg = tiny_experiment(rounds=1, survival_hist_epsilon=None)  # exact histograms: both runs see the same data
    app = build_client_app(SimulatedSites(("A0", "A1", "A2"), CohortSource(data_dir=str(tiny_cohort_dir))))
    finals, weights, grids = [], [], []
    for out, wrap in (("plain", lambda g: g), ("packed", PackingGrid)):
        grid = LocalGrid(app, 3)
        finals.append(Coordinator(cfg, tmp_path / out, expected_sites=3, held_out=("A2",), wait_timeout=5,
                                  printer=lambda s: None).run(wrap(grid)))
        weights.append(torch.load(tmp_path / out / "resume.pt", weights_only=True)["weights"])
        grids.append(grid)
    plain, packed = grids
    with_weights = [m for m in packed.sent + packed.received if m.has_content() and "arrays" in m.content]
    assert with_weights and all(is_packed(m.content["arrays"]) for m in with_weights)
    assert not any(is_packed(m.content["arrays"]) for m in plain.sent if m.has_content() and "arrays" in m.content)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    a, b = (f["held_out"]["A2"] for f in finals)
    assert (a["loss"], a["tasks"]) == (b["loss"], b["tasks"])  # all but the wall-clock seconds
