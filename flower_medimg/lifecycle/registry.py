"""Model registry: every kept global model with its provenance, in SQLite + files.

Nothing to run or install: the registry is a folder holding ``registry.sqlite`` and
the weight files (``models/``) and resume states (``states/``). A *run* row records
one ServerApp run (experiment key, full config, strategy, package versions, how it
ended); a *version* row records one kept global model (round, SHA-256 of the
weights, metrics, contributing node ids, accepted and rejected replies with
reasons, ε when DP is on). The same folder can serve many runs and experiments.

The weight files are PyTorch ``state_dict`` files of the shared parameters; the
SHA-256 (:func:`weights_sha256`) is taken over the tensors themselves (names,
dtypes, shapes and bytes), so it does not depend on how a file was written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flower_medimg.core.models import model_from_settings
from flower_medimg.core.private_params import load_shared_state
from flower_medimg.core.settings import KEEP_POLICIES, resolve_settings

__all__ = [
    "ModelRegistry",
    "load_exported",
    "RegistryError",
    "package_versions",
    "weights_sha256",
]


DB_NAME = "registry.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    flower_run_id TEXT NOT NULL,
    experiment TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    started_at TEXT NOT NULL,
    strategy TEXT NOT NULL,
    config TEXT NOT NULL,
    versions TEXT NOT NULL,
    status TEXT NOT NULL,
    resumed_from INTEGER REFERENCES runs(id),
    best_version INTEGER,
    stop_reason TEXT,
    stop_message TEXT
);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    weights_path TEXT NOT NULL,
    state_path TEXT,
    state_sha256 TEXT,
    metrics TEXT NOT NULL,
    contributors TEXT NOT NULL,
    replies TEXT NOT NULL,
    epsilon REAL
);
"""

_JSON_COLUMNS = ("config", "versions", "metrics", "contributors", "replies")


class RegistryError(RuntimeError):
    """A registry entry is missing or its files do not match their SHA-256."""


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return the SHA-256 of a state dict's tensors (names, dtypes, shapes, bytes).

    Parameters
    ----------
    state_dict : Mapping[str, torch.Tensor]
        Tensors by parameter name (order does not matter).

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        array = np.ascontiguousarray(state_dict[key].detach().cpu().numpy())
        digest.update(key.encode())
        digest.update(f"|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Return the versions of this package and of Flower, MONAI, torch and Opacus."""
    versions = {}
    for name in ("flower-medimg", "flwr", "monai", "torch", "opacus", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _row(cursor: sqlite3.Cursor, values: tuple) -> dict[str, Any]:
    row = {col[0]: value for col, value in zip(cursor.description, values, strict=True)}
    for key in _JSON_COLUMNS:
        if key in row and row[key] is not None:
            row[key] = json.loads(row[key])
    return row


class ModelRegistry:
    """Open (or create) the registry in ``folder``.

    Parameters
    ----------
    folder : str or Path
        Folder of ``registry.sqlite``, ``models/`` and ``states/``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        (self.folder / "models").mkdir(parents=True, exist_ok=True)
        (self.folder / "states").mkdir(exist_ok=True)
        self._db = sqlite3.connect(self.folder / DB_NAME, timeout=60)
        self._db.row_factory = _row
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    # ---- writing ---------------------------------------------------------------

    def start_run(
        self,
        *,
        flower_run_id: int,
        experiment: str,
        run_dir: str | Path,
        strategy: str,
        config: Mapping[str, Any],
        resumed_from: int | None = None,
    ) -> int:
        """Record the start of a ServerApp run; return its registry run id."""
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO runs (flower_run_id, experiment, run_dir, started_at, "
                "strategy, config, versions, status, resumed_from) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (
                    str(flower_run_id),
                    experiment,
                    str(run_dir),
                    _now(),
                    strategy,
                    json.dumps(dict(config)),
                    json.dumps(package_versions()),
                    resumed_from,
                ),
            )
            if resumed_from is not None:
                self._db.execute(
                    "UPDATE runs SET status = 'resumed' WHERE id = ?", (resumed_from,)
                )
        return int(cursor.lastrowid)  # type: ignore[arg-type]

    # pylint: disable-next=too-many-arguments
    def add_version(
        self,
        run: int,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        *,
        metrics: Mapping[str, float],
        contributors: list[int],
        replies: list[dict[str, Any]],
        epsilon: float | None,
    ) -> int:
        """Store one global model version; return its version id.

        Parameters
        ----------
        run : int
            Registry run id from :meth:`start_run`.
        server_round : int
            The round that produced the model.
        state_dict : Mapping[str, torch.Tensor]
            The global (shared) parameters.
        metrics : Mapping[str, float]
            The round's metrics (``round_metrics`` of the stopping module).
        contributors : list[int]
            Node ids whose replies were aggregated.
        replies : list[dict]
            Every train reply: node id, accepted, reason, update norm, weight.
        epsilon : Optional[float]
            Privacy spent so far, when DP is on.
        """
        weights_path = self.folder / "models" / f"run{run}-round{server_round}.pt"
        tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
        torch.save(tensors, weights_path)
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO models (run, round, created_at, sha256, weights_path, "
                "metrics, contributors, replies, epsilon) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run,
                    int(server_round),
                    _now(),
                    weights_sha256(tensors),
                    str(weights_path.relative_to(self.folder)),
                    json.dumps(dict(metrics)),
                    json.dumps([int(n) for n in contributors]),
                    json.dumps(replies),
                    epsilon,
                ),
            )
        return int(cursor.lastrowid)  # type: ignore[arg-type]

    def attach_resume_state(self, version: int, state: bytes) -> None:
        """Store what a restarted ServerApp needs to continue after ``version``.

        Only versions with a resume state are resumed from, so a crash between
        :meth:`add_version` and this call resumes from the version before. The
        run's earlier resume states are deleted: only the newest is ever used.
        """
        path = self.folder / "states" / f"version{version}.pkl"
        path.write_bytes(state)
        run = self.version(version)["run"]
        older = [
            v for v in self.versions(run) if v["state_path"] and v["id"] != version
        ]
        with self._db:
            for row in older:
                self._db.execute(
                    "UPDATE models SET state_path = NULL, state_sha256 = NULL "
                    "WHERE id = ?",
                    (row["id"],),
                )
            self._db.execute(
                "UPDATE models SET state_path = ?, state_sha256 = ? WHERE id = ?",
                (
                    str(path.relative_to(self.folder)),
                    hashlib.sha256(state).hexdigest(),
                    version,
                ),
            )
        for row in older:
            (self.folder / row["state_path"]).unlink(missing_ok=True)

    def set_best(self, run: int, version: int) -> None:
        """Mark ``version`` as the run's best model."""
        with self._db:
            self._db.execute(
                "UPDATE runs SET best_version = ? WHERE id = ?", (version, run)
            )

    def prune(self, run: int, keep: str) -> list[int]:
        """Apply the keep policy to a run's versions; return the deleted ids.

        ``"all"`` keeps everything; ``"best+last"`` keeps the best and the latest
        version (the latest also holds the resume state).
        """
        if keep not in KEEP_POLICIES:
            raise ValueError(
                f"registry.keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}"
            )
        if keep == "all":
            return []
        versions = self.versions(run)
        if not versions:
            return []
        keep_ids = {versions[-1]["id"], self.run(run)["best_version"]}
        dropped = [v for v in versions if v["id"] not in keep_ids]
        with self._db:
            for version in dropped:
                self._db.execute("DELETE FROM models WHERE id = ?", (version["id"],))
        for version in dropped:
            (self.folder / version["weights_path"]).unlink(missing_ok=True)
            if version["state_path"]:
                (self.folder / version["state_path"]).unlink(missing_ok=True)
        return [v["id"] for v in dropped]

    def finish_run(self, run: int, reason: str, message: str) -> None:
        """Record how the run ended (the stop decision)."""
        with self._db:
            self._db.execute(
                "UPDATE runs SET status = 'finished', stop_reason = ?, "
                "stop_message = ? WHERE id = ?",
                (reason, message, run),
            )

    # ---- reading ---------------------------------------------------------------

    def runs(self) -> list[dict[str, Any]]:
        """Return every run, oldest first."""
        return self._db.execute("SELECT * FROM runs ORDER BY id").fetchall()

    def run(self, run: int) -> dict[str, Any]:
        """Return one run.

        Raises
        ------
        RegistryError
            If there is no such run.
        """
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run,)).fetchone()
        if row is None:
            raise RegistryError(f"No run {run} in the registry at {self.folder}")
        return row

    def versions(self, run: int | None = None) -> list[dict[str, Any]]:
        """Return the stored versions (of one run, or all), oldest first."""
        if run is None:
            return self._db.execute("SELECT * FROM models ORDER BY id").fetchall()
        return self._db.execute(
            "SELECT * FROM models WHERE run = ? ORDER BY round", (run,)
        ).fetchall()

    def version(self, version: int) -> dict[str, Any]:
        """Return one version with its run's provenance under ``"run-info"``.

        Raises
        ------
        RegistryError
            If there is no such version (the message lists the stored ids).
        """
        row = self._db.execute(
            "SELECT * FROM models WHERE id = ?", (version,)
        ).fetchone()
        if row is None:
            ids = [v["id"] for v in self.versions()]
            raise RegistryError(
                f"No model version {version} in the registry at {self.folder}; "
                f"stored versions: {ids or 'none'}"
            )
        row["run-info"] = self.run(row["run"])
        return row

    def resumable(self, experiment: str) -> dict[str, Any] | None:
        """Return the latest version of the newest unfinished run of ``experiment``.

        A run is unfinished when it never recorded a stop decision (the ServerApp
        crashed or was killed) and no later run has resumed it.
        """
        row = self._db.execute(
            "SELECT m.id FROM models m JOIN runs r ON m.run = r.id "
            "WHERE r.experiment = ? AND r.status = 'running' "
            "AND m.state_path IS NOT NULL "
            "ORDER BY r.id DESC, m.round DESC LIMIT 1",
            (experiment,),
        ).fetchone()
        return None if row is None else self.version(row["id"])

    def load_weights(self, version: int) -> dict[str, torch.Tensor]:
        """Load a version's weights after checking their SHA-256.

        Raises
        ------
        RegistryError
            If the file is missing or its tensors do not match the stored hash.
        """
        row = self.version(version)
        path = self.folder / row["weights_path"]
        if not path.exists():
            raise RegistryError(f"Weights of version {version} are missing: {path}")
        state = torch.load(path, weights_only=True)
        if weights_sha256(state) != row["sha256"]:
            raise RegistryError(
                f"Weights of version {version} ({path}) do not match their SHA-256"
            )
        return state

    def load_resume_state(self, version: int) -> bytes:
        """Return a version's resume state after checking its SHA-256."""
        row = self.version(version)
        if row["state_path"] is None:
            raise RegistryError(f"Version {version} has no resume state")
        path = self.folder / row["state_path"]
        if not path.exists():
            raise RegistryError(f"Resume state of version {version} is missing: {path}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != row["state_sha256"]:
            raise RegistryError(
                f"Resume state of version {version} ({path}) does not match its SHA-256"
            )
        return data

    def compare(self, first: int, second: int) -> dict[str, Any]:
        """Compare two versions: metrics, config, contributors and weights.

        Returns
        -------
        dict
            ``metrics`` (``{name: [first, second, second - first]}``),
            ``config`` (the keys whose values differ), ``contributors`` of each,
            ``same-weights`` and ``weight-distance`` (L2 norm of the difference
            over the common float tensors; None if the layouts differ).
        """
        a, b = self.version(first), self.version(second)
        metrics = {}
        for key in sorted(set(a["metrics"]) | set(b["metrics"])):
            va, vb = a["metrics"].get(key), b["metrics"].get(key)
            diff = vb - va if va is not None and vb is not None else None
            metrics[key] = [va, vb, diff]
        config_a, config_b = a["run-info"]["config"], b["run-info"]["config"]
        config = {
            key: [config_a.get(key), config_b.get(key)]
            for key in sorted(set(config_a) | set(config_b))
            if config_a.get(key) != config_b.get(key)
        }
        wa, wb = self.load_weights(first), self.load_weights(second)
        distance = None
        if wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa):
            squares = sum(
                float(torch.sum((wa[k].double() - wb[k].double()) ** 2))
                for k in wa
                if wa[k].is_floating_point()
            )
            distance = squares**0.5
        return {
            "versions": [first, second],
            "rounds": [a["round"], b["round"]],
            "metrics": metrics,
            "config": config,
            "contributors": [a["contributors"], b["contributors"]],
            "same-weights": a["sha256"] == b["sha256"],
            "weight-distance": distance,
        }

    def export(self, version: int, out_dir: str | Path) -> Path:
        """Write a version as ``model.pt`` (a MONAI state_dict) + ``model_card.json``.

        The card holds the provenance and the config that rebuilds the network:
        ``model_from_settings(card["config"]).load_state_dict(torch.load("model.pt"))``
        (see :func:`load_exported`).

        Returns
        -------
        Path
            The folder written.
        """
        row = self.version(version)
        self.load_weights(version)  # checks the SHA-256 first
        out = Path(out_dir).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.folder / row["weights_path"], out / "model.pt")
        run = row["run-info"]
        private = run["config"].get("private-params", "none")
        card = {
            "format": "PyTorch state_dict of a MONAI network (flower-medimg)",
            "version": row["id"],
            "sha256": row["sha256"],
            "round": row["round"],
            "created-at": row["created_at"],
            "run": {k: run[k] for k in ("id", "flower_run_id", "experiment")},
            "strategy": run["strategy"],
            "stop": {"reason": run["stop_reason"], "message": run["stop_message"]},
            "best": run["best_version"] == row["id"],
            "metrics": row["metrics"],
            "contributors": row["contributors"],
            "replies": row["replies"],
            "epsilon": row["epsilon"],
            "versions": run["versions"],
            "config": run["config"],
            "private-parameters": private,
            "load": (
                "from flower_medimg.lifecycle import load_exported; "
                "model = load_exported(folder)"
            ),
        }
        (out / "model_card.json").write_text(json.dumps(card, indent=2))
        return out


def load_exported(folder: str | Path) -> torch.nn.Module:
    """Rebuild the MONAI network of an exported version and load its weights.

    Parameters
    ----------
    folder : str or Path
        A folder written by :meth:`ModelRegistry.export`.

    Raises
    ------
    RegistryError
        If the weights do not match the SHA-256 in the model card.
    """
    folder = Path(folder)
    card = json.loads((folder / "model_card.json").read_text())
    state = torch.load(folder / "model.pt", weights_only=True)
    if weights_sha256(state) != card["sha256"]:
        raise RegistryError(f"{folder / 'model.pt'} does not match its model card")
    settings = resolve_settings(card["config"])
    model = model_from_settings(settings)
    return load_shared_state(model, state, settings["private-params"])
