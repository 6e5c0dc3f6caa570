"""Shared test set-up."""

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True, scope="session")
def task_identity():
    """Give this process the task identity Flower's runtime sets before a task runs.

    Constructing a ``Message`` outside a runtime (as the unit tests do) needs it.
    """
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    yield
