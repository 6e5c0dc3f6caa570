import pytest

from flower_medimg.node_deadline import NodeDeadlineGrid, TooFewNodesError


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
