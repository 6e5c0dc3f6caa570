"""Site state that must survive rounds and, in deployment, SuperNode restarts.

Flower keeps a ClientApp's ``context.state`` between rounds, but a SuperNode holds it
in memory only. :class:`SiteState` therefore writes every entry through to the site's
state folder (``node_config["state-dir"]``) when there is one, atomically (a temporary
file renamed into place), and reads it back when ``context.state`` does not have it:
after a restart, and in the next run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord

__all__ = ["SiteState"]


class SiteState:
    """Named tensors and JSON blobs kept in ``context.state`` and the state folder.

    Parameters
    ----------
    context : Context
        The ClientApp's context (``state`` and ``node_config``).
    """

    def __init__(self, context: Context) -> None:
        self._state = context.state
        state_dir = context.node_config.get("state-dir")
        self.directory = Path(str(state_dir)).expanduser() if state_dir else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """Return the tensors stored as ``name``, or None if there are none."""
        if name in self._state:
            return self._state[name].to_torch_state_dict()
        path = self._path(name, ".pt")
        if path is not None and path.exists():
            tensors = torch.load(path, weights_only=True)
            self._state[name] = ArrayRecord(tensors)
            return tensors
        return None

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` as ``name`` (and write them to the state folder)."""
        self._state[name] = ArrayRecord(
            {k: v.detach().cpu() for k, v in tensors.items()}
        )
        path = self._path(name, ".pt")
        if path is not None:
            _atomic_write(path, lambda handle: torch.save(tensors, handle))

    def load_json(self, name: str) -> Any | None:
        """Return the JSON value stored as ``name``, or None."""
        if name in self._state:
            return json.loads(str(self._state[name]["json"]))
        path = self._path(name, ".json")
        if path is not None and path.exists():
            value = json.loads(path.read_text())
            self._state[name] = ConfigRecord({"json": json.dumps(value)})
            return value
        return None

    def save_json(self, name: str, value: Any) -> None:
        """Store a JSON-serialisable ``value`` as ``name``."""
        text = json.dumps(value)
        self._state[name] = ConfigRecord({"json": text})
        path = self._path(name, ".json")
        if path is not None:
            _atomic_write(path, lambda handle: handle.write(text.encode()))

    def restore_metrics(self, name: str) -> None:
        """Put the MetricRecord saved as ``name`` back into ``context.state``."""
        path = self._path(name, ".json")
        if name not in self._state and path is not None and path.exists():
            self._state[name] = MetricRecord(json.loads(path.read_text()))

    def persist_metrics(self, name: str) -> None:
        """Write the MetricRecord ``context.state[name]`` to the state folder."""
        path = self._path(name, ".json")
        if name in self._state and path is not None:
            text = json.dumps(dict(self._state[name]))
            _atomic_write(path, lambda handle: handle.write(text.encode()))

    def _path(self, name: str, suffix: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{name}{suffix}"


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` so that a crash leaves either the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
