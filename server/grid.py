"""Grid wrappers: replies polled often instead of Flower's fixed 3-second sleep, weights packed."""

from __future__ import annotations

import time

from umeml.flower.packing import pack_message, unpacked

SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID in Flower 1.42 (tests/test_resume_safety.py)


class FastPollGrid:
    """Delegates to a Flower Grid, but ``send_and_receive`` pulls replies every ``poll`` seconds.

    Flower 1.42's Grid sleeps 3 s between pulls; with several message waves per round that
    dominates a small federation's round time on loopback.
    """

    def __init__(self, grid, poll: float = 0.05):
        self._grid = grid
        self._poll = poll

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        """Push ``messages`` and collect replies until all arrived or ``timeout`` seconds passed."""
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        origin = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
        pending = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = [attribute_reply(r, origin) for r in self._grid.pull_messages(pending)]
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll)
        return replies


def attribute_reply(reply, origin: dict[str, int]):
    """The reply with the node it is about as its sender.

    Flower 1.42's SuperLink answers a message to a node that stopped its heartbeat with an error
    reply *from the SuperLink* (``src_node_id`` 1, "Node Unavailable"); logs and reports would
    then name node 1 instead of the site that died. ``origin`` maps each sent message id to its
    destination node. Metadata has no setter, so the field is set where Flower keeps it (pinned
    by a test that fails should an upgrade move it).
    """
    node = origin.get(reply.metadata.reply_to_message_id)
    if node is not None and reply.metadata.src_node_id == SUPERLINK_NODE_ID and node != SUPERLINK_NODE_ID:
        reply.metadata.__dict__["_src_node_id"] = node
    return reply


class PackingGrid:
    """Delegates to a grid; the weights of the messages ``send_and_receive`` sends travel packed
    (one array per dtype, :mod:`umeml.flower.packing`), and the replies are unpacked before the
    coordinator sees them, so that screening, partial updates and the strategies work on
    per-tensor records as before."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        """Pack, send, collect, unpack (the messages of a wave share the global weights: packed once)."""
        packed: dict = {}
        replies = self._grid.send_and_receive([pack_message(m, packed) for m in messages], timeout=timeout)
        return [unpacked(reply) for reply in replies]
