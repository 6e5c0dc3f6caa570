import logging

import pytest
from flwr.app import Error, Message, RecordDict
from reply_messages import reply_metadata

from flower_medimg.lifecycle.node_deadline import NodeDeadlineGrid, TooFewNodesError


class ListGrid:
    """The one Grid method the wrapper reads, over a list we control."""

    def __init__(self, node_ids):
        self.node_ids = node_ids
        self.run = "run-object"

    def get_node_ids(self):
        return list(self.node_ids)


def test_enough_nodes_pass_through_and_other_attributes_delegate():
    grid = NodeDeadlineGrid(ListGrid([1, 2, 3]), required_nodes=2, timeout=5)
    assert grid.get_node_ids() == [1, 2, 3]
    assert grid.run == "run-object"


def test_shortfall_raises_after_deadline_and_resets_on_recovery():
    now = [0.0]
    inner = ListGrid([1])
    grid = NodeDeadlineGrid(inner, required_nodes=2, timeout=10, clock=lambda: now[0])
    assert grid.get_node_ids() == [1]  # shortfall starts at t=0
    now[0] = 10.0
    assert grid.get_node_ids() == [1]  # exactly at the deadline: still waiting
    inner.node_ids = [1, 2]
    now[0] = 11.0
    assert grid.get_node_ids() == [1, 2]  # recovered: clock resets
    inner.node_ids = [2]
    now[0] = 12.0
    grid.get_node_ids()
    now[0] = 22.5
    with pytest.raises(
        TooFewNodesError, match=r"Only 1 node\(s\) connected .* needs 2"
    ):
        grid.get_node_ids()


def _message(src, dst, error=False):
    metadata = reply_metadata(src, dst)
    if error:
        return Message(Error(code=0, reason="Node Unavailable"), metadata=metadata)
    return Message(RecordDict(), metadata=metadata)


class ReplyingGrid(ListGrid):
    """Answers for the nodes in ``healthy``; a dead node's error comes from node 1.

    Each pull returns at most one new reply, so the wrapper has to pull repeatedly.
    """

    def __init__(self, node_ids, healthy, now):
        super().__init__(node_ids)
        self.healthy = healthy
        self.now = now  # a one-item list: the fake clock, one second per pull
        self.queued = []
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            dst = msg.metadata.dst_node_id
            msg_id = f"msg-{dst}"
            ids.append(msg_id)
            if dst in self.healthy:
                reply = _message(dst, 1)
            elif dst == 12:  # the SuperLink answers for a vanished SuperNode
                reply = _message(1, 1, error=True)
            else:  # node 13 times out: no reply at all
                continue
            reply.metadata.__dict__["_reply_to_message_id"] = msg_id
            self.queued.append(reply)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        self.now[0] += 1.0
        ready = [
            m for m in self.queued if m.metadata.reply_to_message_id in message_ids
        ]
        return ready[:1]


def test_nodes_without_a_valid_reply_are_named(caplog):
    now = [0.0]
    inner = ReplyingGrid([10, 11, 12, 13], {10, 11}, now)
    grid = NodeDeadlineGrid(inner, 2, 60, clock=lambda: now[0])
    sent = [_message(1, node) for node in (10, 11, 12, 13)]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        replies = grid.send_and_receive(sent, timeout=5)
    assert len(replies) == 3
    # one reply per pull, then pulls for the silent node until the timeout
    assert inner.pulls == 5
    assert "No valid train reply from node(s) [12, 13]" in caplog.text
