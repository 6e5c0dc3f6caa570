"""Model registry: every kept global model with its provenance, in SQLite + files.

Nothing to run or install: the registry is a folder holding ``registry.sqlite`` and
the weight files (``models/``) and resume states (``states/``), all safetensors
(nothing in the folder is ever unpickled). A *run* row records one ServerApp run
(experiment key, full config, strategy, package versions, how it ended, the head of
its audit log); a *version* row records one kept global model (round, SHA-256 of
the weights, metrics, contributing node ids, accepted and rejected replies with
reasons, ε when DP is on, the audit head after its round). The same folder can
serve many runs and experiments.

Every row is signed with the server key (:mod:`.integrity`) over all its columns,
and a version row holds the SHA-256 of its weight and resume-state files, so a
record or file changed outside flower-medimg is refused before anything is parsed:
whoever can write this folder cannot make the ServerApp resume from a state it
did not write.

A round is recorded in one transaction (its version, its resume state, the best
mark and the keep policy), after its files are complete on disk: a round is either
fully recorded or not at all. A locked database is retried with exponential
backoff for ``lock_timeout`` seconds; then, as on a full disk, the registry raises
:class:`RegistryUnavailableError` naming the file, and the ServerApp stops cleanly after
the round (see :mod:`.driver`). Every error names the database or file.

The SHA-256 of a version (:func:`weights_sha256`) is taken over the tensors
themselves (names, dtypes, shapes and bytes), so it does not depend on how a file
was written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import safetensors.torch
import torch

from flower_medimg.core.models import model_from_settings
from flower_medimg.core.private_params import load_shared_state
from flower_medimg.core.settings import KEEP_POLICIES, resolve_settings

from .integrity import ServerKey, VerifyKey

__all__ = [
    "DB_NAME",
    "ModelRegistry",
    "RegistryError",
    "RegistryTamperedError",
    "RegistryUnavailableError",
    "load_exported",
    "package_versions",
    "weights_sha256",
]


DB_NAME = "registry.sqlite"
#: ``PRAGMA user_version`` of this schema (signed rows, safetensors files).
SCHEMA_VERSION = 2

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
    stop_message TEXT,
    audit_head TEXT,
    audit_lines INTEGER,
    signature TEXT
);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    weights_path TEXT NOT NULL,
    weights_file_sha256 TEXT NOT NULL,
    state_path TEXT,
    state_sha256 TEXT,
    metrics TEXT NOT NULL,
    contributors TEXT NOT NULL,
    replies TEXT NOT NULL,
    epsilon REAL,
    audit_head TEXT NOT NULL,
    audit_lines INTEGER NOT NULL,
    signature TEXT
);
"""

_JSON_COLUMNS = ("config", "versions", "metrics", "contributors", "replies")
#: SQLite result codes (the low byte of an extended code).
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_FULL_CODES = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)

T = TypeVar("T")


class RegistryError(RuntimeError):
    """A registry entry is missing, unreadable, or its files do not match."""


class RegistryTamperedError(RegistryError):
    """A registry record or file was changed outside flower-medimg (bad signature)."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be written now: locked past the retry window, disk full."""


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


def _payload(table: str, row: Mapping[str, Any]) -> bytes:
    """Return the bytes a row's signature covers: its table and its columns."""
    body = {k: v for k, v in row.items() if k not in ("signature", "run-info")}
    return json.dumps(
        {"table": table, "row": body}, sort_keys=True, separators=(",", ":")
    ).encode()


def _error_code(err: sqlite3.Error) -> int:
    return getattr(err, "sqlite_errorcode", -1) & 0xFF


class ModelRegistry:
    """Open (or create) the registry in ``folder``.

    Parameters
    ----------
    folder : str or Path
        Folder of ``registry.sqlite``, ``models/`` and ``states/``.
    key : VerifyKey
        The server key: a :class:`~.integrity.ServerKey` to write (it signs every
        row), its public half to read and verify only.
    read_only : bool
        Open an existing database without writing anything (the CLI, the audit).
    lock_timeout : float
        Seconds to keep retrying (exponential backoff) while the database is
        locked by another process.

    Raises
    ------
    RegistryError
        If the database cannot be opened, is corrupt, or is of an older format; the
        message names the file.
    """

    def __init__(
        self,
        folder: str | Path,
        key: VerifyKey,
        *,
        read_only: bool = False,
        lock_timeout: float = 60.0,
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.database = self.folder / DB_NAME
        self.key = key
        self.lock_timeout = lock_timeout
        if read_only and not self.database.is_file():
            raise RegistryError(f"No registry database at {self.database}")
        if not read_only:
            try:
                (self.folder / "models").mkdir(parents=True, exist_ok=True)
                (self.folder / "states").mkdir(exist_ok=True)
            except OSError as err:
                raise RegistryUnavailableError(
                    f"Cannot create the registry folder {self.folder}: {err}"
                ) from None
        self._db = self._attempt("open the database", self._connect, read_only)

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        uri = f"{self.database.as_uri()}?mode={'ro' if read_only else 'rwc'}"
        db = sqlite3.connect(uri, uri=True, timeout=0.05)
        try:
            db.row_factory = _row
            version = db.execute("PRAGMA user_version").fetchone()["user_version"]
            tables = db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'runs'"
            ).fetchall()
            if tables and version != SCHEMA_VERSION:
                raise RegistryError(
                    f"The registry {self.database} has format {version}, not "
                    f"{SCHEMA_VERSION} (an earlier flower-medimg wrote unsigned "
                    "records and pickled resume states, which are not read any "
                    "more); set registry.path to a new folder"
                )
            if not tables and not read_only:
                with db:
                    db.executescript(_SCHEMA)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    # ---- errors, retries and signatures ----------------------------------------

    def _attempt(self, doing: str, action: Callable[..., T], *args: Any) -> T:
        """Run ``action``, retrying with backoff while the database is locked.

        Raises
        ------
        RegistryUnavailableError
            Still locked after ``lock_timeout`` seconds, or the disk is full.
        RegistryError
            Any other database error (a corrupt file), naming the database.
        """
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                return action(*args)
            except sqlite3.Error as err:
                code = _error_code(err)
                if code in _BUSY_CODES and time.monotonic() < deadline:
                    time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
                    delay = min(delay * 2, 2.0)
                    continue
                if code in _BUSY_CODES:
                    raise RegistryUnavailableError(
                        f"Registry {self.database}: cannot {doing}: {err} (still "
                        f"locked after retrying for {self.lock_timeout:g} s)"
                    ) from None
                kind = (
                    RegistryUnavailableError if code in _FULL_CODES else RegistryError
                )
                raise kind(f"Registry {self.database}: cannot {doing}: {err}") from None

    def _sign(self, table: str, row_id: int) -> None:
        """Sign one row again after a change (inside the caller's transaction)."""
        if not isinstance(self.key, ServerKey):
            raise RegistryError(
                f"Registry {self.database} is open with a public key only "
                f"({self.key.source}): it cannot be written"
            )
        row = self._db.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,))
        signature = self.key.sign(_payload(table, row.fetchone()))
        self._db.execute(
            f"UPDATE {table} SET signature = ? WHERE id = ?", (signature, row_id)
        )

    def signature_ok(self, table: str, row: Mapping[str, Any]) -> bool:
        """Return whether a row (``runs`` or ``models``) carries a valid signature."""
        signature = row.get("signature")
        return isinstance(signature, str) and self.key.verify(
            _payload(table, row), signature
        )

    def _verified(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        if not self.signature_ok(table, row):
            what = "run" if table == "runs" else "model version"
            raise RegistryTamperedError(
                f"Registry {self.database}: the record of {what} {row['id']} does "
                f"not match its signature (server key {self.key.fingerprint}): it was "
                "changed outside flower-medimg; nothing of it is used"
            )
        return row

    @contextmanager
    def _new_files(self) -> Iterator[list[Path]]:
        """Collect the files written for one record; delete them if it fails."""
        written: list[Path] = []
        try:
            yield written
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise

    def _write_file(self, relative: str, data: bytes, written: list[Path]) -> None:
        """Write ``data`` completely (temporary file, fsync, rename) or not at all."""
        path = self.folder / relative
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            with temporary.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            kind = (
                RegistryUnavailableError if err.errno == errno.ENOSPC else RegistryError
            )
            raise kind(f"Registry: cannot write {path}: {err.strerror}") from None
        written.append(path)

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
        best_version: int | None = None,
    ) -> int:
        """Record the start of a ServerApp run; return its registry run id.

        A resumed run names the run it continues (marked ``resumed``) and that
        run's best version, which stays its best until a better round.
        """

        def insert() -> int:
            with self._db:
                cursor = self._db.execute(
                    "INSERT INTO runs (flower_run_id, experiment, run_dir, started_at, "
                    "strategy, config, versions, status, resumed_from, best_version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                    (
                        str(flower_run_id),
                        experiment,
                        str(run_dir),
                        _now(),
                        strategy,
                        json.dumps(dict(config)),
                        json.dumps(package_versions()),
                        resumed_from,
                        best_version,
                    ),
                )
                run = int(cursor.lastrowid)  # type: ignore[arg-type]
                self._sign("runs", run)
                if resumed_from is not None:
                    self._db.execute(
                        "UPDATE runs SET status = 'resumed' WHERE id = ?",
                        (resumed_from,),
                    )
                    self._sign("runs", resumed_from)
            return run

        return self._attempt("record the run's start", insert)

    # pylint: disable-next=too-many-arguments,too-many-locals
    def record_round(
        self,
        run: int,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        *,
        metrics: Mapping[str, float],
        contributors: list[int],
        replies: list[dict[str, Any]],
        epsilon: float | None,
        resume_state: bytes,
        best: bool,
        keep: str,
        audit_head: str,
        audit_lines: int,
    ) -> tuple[int, list[int]]:
        """Store one round's global model and resume state; apply the keep policy.

        The weight and state files are written completely first, then one
        transaction adds the version with its resume state, removes the resume
        state of the run's earlier versions (only the newest is ever used), marks
        the best version and deletes what ``keep`` does not keep. If any of it fails
        nothing of the round is recorded and its new files are deleted, so the
        registry still resumes from the previous round.

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
        resume_state : bytes
            What a restarted ServerApp needs to continue after this round.
        best : bool
            Whether this version is the run's best so far.
        keep : str
            ``"all"`` keeps every version; ``"best+last"`` the best and the latest
            (which holds the resume state).
        audit_head, audit_lines : str, int
            The audit log's head and number of lines after the round's events.

        Returns
        -------
        tuple[int, list[int]]
            The new version id and the ids the keep policy deleted.

        Raises
        ------
        RegistryUnavailableError
            The database stayed locked or the disk is full (nothing was recorded).
        """
        if keep not in KEEP_POLICIES:
            raise ValueError(
                f"registry.keep must be one of {', '.join(KEEP_POLICIES)}, got {keep!r}"
            )
        tensors = {
            k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()
        }
        weights = safetensors.torch.save(tensors)
        weights_path = f"models/run{run}-round{server_round}.safetensors"
        state_path = f"states/run{run}-round{server_round}.safetensors"
        with self._new_files() as written:
            self._write_file(weights_path, weights, written)
            self._write_file(state_path, resume_state, written)

            def insert() -> tuple[int, list[dict[str, Any]]]:
                with self._db:
                    cursor = self._db.execute(
                        "INSERT INTO models (run, round, created_at, sha256, "
                        "weights_path, weights_file_sha256, state_path, state_sha256, "
                        "metrics, contributors, replies, epsilon, audit_head, "
                        "audit_lines) "
                        f"VALUES ({', '.join('?' * 14)})",
                        (
                            run,
                            int(server_round),
                            _now(),
                            weights_sha256(tensors),
                            weights_path,
                            hashlib.sha256(weights).hexdigest(),
                            state_path,
                            hashlib.sha256(resume_state).hexdigest(),
                            json.dumps(dict(metrics)),
                            json.dumps([int(n) for n in contributors]),
                            json.dumps(replies),
                            epsilon,
                            audit_head,
                            int(audit_lines),
                        ),
                    )
                    version = int(cursor.lastrowid)  # type: ignore[arg-type]
                    self._sign("models", version)
                    return version, self._retire(run, version, best, keep)

            version, retired = self._attempt(
                f"record round {server_round} of run {run}", insert
            )
        for row in retired:  # after the commit: the files are no longer referenced
            for column in ("state_path", "weights_path"):
                if row.get(column):
                    (self.folder / row[column]).unlink(missing_ok=True)
        return version, [row["id"] for row in retired if "weights_path" in row]

    def _retire(
        self, run: int, version: int, best: bool, keep: str
    ) -> list[dict[str, Any]]:
        """Drop old resume states, mark the best, prune; return what was retired.

        Returns one ``{"id", "state_path"}`` per earlier state dropped and one full
        row per deleted version (which has ``weights_path``).
        """
        if best:
            self._db.execute(
                "UPDATE runs SET best_version = ? WHERE id = ?", (version, run)
            )
            self._sign("runs", run)
        older = self._db.execute(
            "SELECT id, state_path FROM models WHERE run = ? AND id != ? "
            "AND state_path IS NOT NULL",
            (run, version),
        ).fetchall()
        for row in older:
            self._db.execute(
                "UPDATE models SET state_path = NULL, state_sha256 = NULL WHERE id = ?",
                (row["id"],),
            )
            self._sign("models", row["id"])
        dropped: list[dict[str, Any]] = []
        if keep == "best+last":
            best_version = self._db.execute(
                "SELECT best_version FROM runs WHERE id = ?", (run,)
            ).fetchone()["best_version"]
            dropped = self._db.execute(
                "SELECT * FROM models WHERE run = ? AND id NOT IN (?, ?)",
                (run, version, best_version if best_version is not None else -1),
            ).fetchall()
            for row in dropped:
                self._db.execute("DELETE FROM models WHERE id = ?", (row["id"],))
        return older + dropped

    def finish_run(
        self, run: int, reason: str, message: str, audit_head: str, audit_lines: int
    ) -> None:
        """Record how the run ended (the stop decision) and its log's last line."""

        def update() -> None:
            with self._db:
                self._db.execute(
                    "UPDATE runs SET status = 'finished', stop_reason = ?, "
                    "stop_message = ?, audit_head = ?, audit_lines = ? WHERE id = ?",
                    (reason, message, audit_head, int(audit_lines), run),
                )
                self._sign("runs", run)

        self._attempt(f"record the end of run {run}", update)

    # ---- reading ---------------------------------------------------------------

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return self._attempt(
            "read the database", lambda: self._db.execute(sql, args).fetchall()
        )

    def runs(self) -> list[dict[str, Any]]:
        """Return every run, oldest first (signatures unchecked: see ``run``)."""
        return self._query("SELECT * FROM runs ORDER BY id")

    def run(self, run: int) -> dict[str, Any]:
        """Return one run, after checking its signature.

        Raises
        ------
        RegistryError
            If there is no such run.
        RegistryTamperedError
            If its record does not match its signature.
        """
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run,))
        if not rows:
            raise RegistryError(f"No run {run} in the registry {self.database}")
        return self._verified("runs", rows[0])

    def versions(self, run: int | None = None) -> list[dict[str, Any]]:
        """Return the stored versions (of one run, or all), oldest first.

        Signatures are not checked here (``registry list`` marks bad ones); every
        use of a version's files goes through :meth:`version`, which checks.
        """
        if run is None:
            return self._query("SELECT * FROM models ORDER BY id")
        return self._query(
            "SELECT * FROM models WHERE run = ? ORDER BY round, id", (run,)
        )

    def version(self, version: int) -> dict[str, Any]:
        """Return one verified version with its run's provenance under ``"run-info"``.

        Raises
        ------
        RegistryError
            If there is no such version (the message lists the stored ids).
        RegistryTamperedError
            If the version's or its run's record does not match its signature.
        """
        rows = self._query("SELECT * FROM models WHERE id = ?", (version,))
        if not rows:
            ids = [v["id"] for v in self.versions()]
            raise RegistryError(
                f"No model version {version} in the registry {self.database}; "
                f"stored versions: {ids or 'none'}"
            )
        row = self._verified("models", rows[0])
        row["run-info"] = self.run(row["run"])
        return row

    def resumable(self, experiment: str) -> dict[str, Any] | None:
        """Return the latest version of the newest unfinished run of ``experiment``.

        A run is unfinished when it never recorded a stop decision (the ServerApp
        crashed, was killed or stopped on an unavailable registry) and no later run
        has resumed it.

        Raises
        ------
        RegistryTamperedError
            If that version or its run does not verify: the ServerApp must not
            start from it, nor silently start afresh.
        """
        rows = self._query(
            "SELECT m.id FROM models m JOIN runs r ON m.run = r.id "
            "WHERE r.experiment = ? AND r.status = 'running' "
            "AND m.state_path IS NOT NULL "
            "ORDER BY r.id DESC, m.round DESC LIMIT 1",
            (experiment,),
        )
        if not rows:
            return None
        try:
            return self.version(rows[0]["id"])
        except RegistryTamperedError as err:
            raise RegistryTamperedError(
                f"Refusing to resume: {err}. Look into it (flower-medimg registry "
                "verify), or start afresh with registry.resume = false."
            ) from None

    def _read_checked(self, path: Path, sha256: str, what: str) -> bytes:
        if not path.is_file():
            raise RegistryError(f"{what} is missing: {path}")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise RegistryError(f"Cannot read {what} {path}: {err}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RegistryTamperedError(
                f"{what} ({path}) does not match the SHA-256 in its signed record: "
                "it was changed outside flower-medimg; it is not loaded"
            )
        return data

    def load_weights(self, version: int) -> dict[str, torch.Tensor]:
        """Load a version's weights after checking its record and file.

        Raises
        ------
        RegistryError
            If the file is missing, or does not match its signed record.
        """
        row = self.version(version)
        path = self.folder / row["weights_path"]
        data = self._read_checked(
            path, row["weights_file_sha256"], f"Weights of version {version}"
        )
        state = safetensors.torch.load(data)
        if weights_sha256(state) != row["sha256"]:
            raise RegistryTamperedError(
                f"Weights of version {version} ({path}) do not match their SHA-256"
            )
        return state

    def load_resume_state(self, version: int) -> bytes:
        """Return a version's resume state after checking its record and SHA-256.

        Raises
        ------
        RegistryError
            If the version has no state, or the file is missing or changed.
        """
        row = self.version(version)
        if row["state_path"] is None:
            raise RegistryError(f"Version {version} has no resume state")
        return self._read_checked(
            self.folder / row["state_path"],
            row["state_sha256"],
            f"Resume state of version {version}",
        )

    def audit_anchor(self, run: int) -> dict[str, Any]:
        """Return the latest head of a run's audit log that the registry recorded.

        Returns
        -------
        dict
            ``lines`` and ``head`` (the number and hash of the log's last line at
            the latest record) and ``finished`` (the head is the ``run-end`` line).

        Raises
        ------
        RegistryTamperedError
            If the run's record or one of its versions does not verify.
        """
        info = self.run(run)
        anchors = [(info["audit_lines"] or 0, info["audit_head"] or "")]
        for row in self.versions(run):
            self._verified("models", row)
            anchors.append((row["audit_lines"], row["audit_head"]))
        lines, head = max(anchors)
        return {
            "lines": lines,
            "head": head,
            "finished": info["status"] == "finished" and info["audit_head"] == head,
        }

    def verify(self) -> list[str]:
        """Check every record's signature and every file's SHA-256.

        Returns
        -------
        list[str]
            One sentence per problem (empty: everything verifies).
        """
        problems = []
        for table, rows in (("runs", self.runs()), ("models", self.versions())):
            for row in rows:
                if not self.signature_ok(table, row):
                    what = "run" if table == "runs" else "version"
                    problems.append(f"{what} {row['id']}: record not signed by the key")
        for row in self.versions():
            files = [("weights_path", "weights_file_sha256")]
            if row["state_path"]:
                files.append(("state_path", "state_sha256"))
            for path_column, sha_column in files:
                try:
                    self._read_checked(
                        self.folder / row[path_column],
                        row[sha_column],
                        f"version {row['id']}: {path_column[:-5]}",
                    )
                except RegistryError as err:
                    problems.append(str(err))
        return problems

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

        The card holds the provenance, the config that rebuilds the network
        (``model_from_settings(card["config"])``, see :func:`load_exported`), the
        audit log's head after the version's round and at the run's end, and the
        signed registry record with its signature and the server's public key, so
        that whoever receives the card can check it came from this server.

        Returns
        -------
        Path
            The folder written.
        """
        row = self.version(version)
        state = self.load_weights(version)  # checks record and file first
        out = Path(out_dir).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / "model.pt")
        run = row["run-info"]
        private = run["config"].get("private-params", "none")
        record = {k: v for k, v in row.items() if k not in ("run-info", "signature")}
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
            "audit": {
                "log": str(Path(run["run_dir"]) / "audit.jsonl"),
                "head": row["audit_head"],
                "lines": row["audit_lines"],
                "run-end-head": run["audit_head"],
                "run-end-lines": run["audit_lines"],
            },
            "integrity": {
                "scheme": "Ed25519 over the registry record (flower-medimg)",
                "key-fingerprint": self.key.fingerprint,
                "public-key": self.key.public_pem(),
                "record": record,
                "signature": row["signature"],
            },
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
