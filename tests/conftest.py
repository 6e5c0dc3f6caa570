"""Shared test set-up."""

import pytest
from flwr.supercore.task_identity import TaskIdentity

from flower_medimg.core import settings
from flower_medimg.lifecycle.integrity import KEY_ENV


@pytest.fixture(autouse=True, scope="session")
def task_identity():
    """Give this process the task identity Flower's runtime sets before a task runs.

    Constructing a ``Message`` outside a runtime (as the unit tests do) needs it.
    """
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    yield


@pytest.fixture(autouse=True, scope="session")
def server_key(tmp_path_factory):
    """Sign registries and audit logs with a key of this session, not ~/.flower-medimg.

    Set in the environment, so ServerApp processes started by the tests use it too.
    """
    path = tmp_path_factory.mktemp("server-key") / "server_ed25519.pem"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, str(path))
        yield path


@pytest.fixture(autouse=True)
def isolated_model_registry(tmp_path_factory, monkeypatch):
    """Give every test its own model registry instead of ``./registry``.

    A registry shared between tests would let one test resume another's
    unfinished run of the same config.
    """
    folder = str(tmp_path_factory.mktemp("registry"))
    # a patched copy for resolve_settings; SETTINGS itself still mirrors pyproject.toml
    monkeypatch.setattr(
        settings, "DEFAULTS", {**settings.DEFAULTS, "registry.path": folder}
    )
