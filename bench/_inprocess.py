"""An in-process federation for benchmarks: the real Coordinator and the real ClientApp
handlers, messages delivered by direct calls (no Ray, no processes), as the tests' LocalGrid
does. On a busy 2-core machine this is several times faster than Flower's simulation engine
and gives the same protocol (handshake, preprocessing, rounds, evaluation, privacy ledgers).

It relies on Flower 1.42's Message/Metadata constructors and TaskIdentity (pinned like the
tests' grid).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message, RecordDict
from flwr.common import Metadata
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.task_identity import TaskIdentity

from umeml.client.app import SimulatedSites, build_client_app
from umeml.config import ExperimentConfig
from umeml.data.cohort import Cohort
from umeml.data.source import CohortSource
from umeml.rundir import RunDir
from umeml.server.coordinator import Coordinator
from umeml.server.pooled import pooled_evaluator
from umeml.server.simulate import plan_sites


class DirectGrid:
    """Nodes 101, 102, ... each playing one site through ``client_app``; one Context per node
    for the whole run (as a SuperNode keeps it)."""

    def __init__(self, client_app, n_nodes: int):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app = client_app
        self.node_ids = [101 + i for i in range(n_nodes)]
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": n_nodes},
                                    state=RecordDict(), run_config={}) for i, n in enumerate(self.node_ids)}

    def get_node_ids(self):
        """Every node is connected."""
        return list(self.node_ids)

    def get_nodes(self):
        """Node records without registered names."""
        return [NodeInfo(node_id=n) for n in self.node_ids]

    def send_and_receive(self, messages, *, timeout=None):
        """Deliver each message to its node's handlers; return the replies."""
        replies = []
        for msg in messages:
            node, md = msg.metadata.dst_node_id, msg.metadata
            delivered = Message(msg.content, metadata=Metadata(
                run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=node, reply_to_message_id="",
                group_id=md.group_id, created_at=time.time(), ttl=md.ttl, message_type=md.message_type,
                src_task_id=1, dst_task_id=2))
            replies.append(self.app(delivered, self.contexts[node]))
        return replies


def federate(cfg: ExperimentConfig, cohort: Cohort, source: CohortSource, run_dir: str | Path,
             held_out: tuple[str, ...] | None = None, pooled: bool = False,
             on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Run the federation in this process; returns final.json's content (privacy ledgers in
    ``run_dir/sites``).

    ``pooled``: also score the held-out patients pooled, as ``umeml-server simulate`` does
    (``final["pooled"]``). ``on_round(round, weights)``: called with every round's global
    weights as the round ends (a benchmark's own diagnostics; the run is unchanged by it).
    """
    sites, held = plan_sites(cfg, cohort, held_out)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = source.resolved()
    app = build_client_app(SimulatedSites(tuple(sites), source, "cpu",
                                          state_root=str(RunDir(run_dir.resolve()).sites)))
    evaluator = (pooled_evaluator({**source.settings(), "run-dir": str(run_dir)}, cfg, held) if pooled else None)
    coord = Coordinator(cfg, run_dir, expected_sites=len(sites), held_out=held, wait_timeout=5,
                        printer=lambda s: None, pooled_eval=evaluator)
    if on_round is not None:
        _observe_rounds(coord, on_round)
    return coord.run(DirectGrid(app, len(sites)))


def _observe_rounds(coord: Coordinator, on_round: Callable[[int, dict], None]) -> None:
    """Call ``on_round`` with each round's global weights: the coordinator offers them to its
    round selector when the round ends, so the selector it builds is wrapped (Coordinator
    internals of this repository, not Flower's)."""
    build = coord._selector

    def selector(state):
        sel = build(state)
        offer = sel.offer

        def observed(rnd, weights):
            on_round(rnd, weights)
            offer(rnd, weights)

        sel.offer = observed
        return sel

    coord._selector = selector
