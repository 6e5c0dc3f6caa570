"""Attacks on and faults of the server's disk: registry, resume state, audit log.

Each test is one probe of the threat model's promises 5 and 6 (no code from data;
history cannot be rewritten unseen) and of issue 13's "nothing finished is lost":
a planted pickle, malformed resume states, forged audit logs, a registry locked
past its retry window, a full disk and a corrupt database file.

The runs go through the real ServerApp code (:func:`run_experiment`: settings,
strategy, lifecycle driver, registry, audit, outputs) and the real ClientApp,
which trains TINY models on synthetic sites. Only the transport is replaced: the
:class:`InProcessGrid` hands each message to the ClientApp in this process, as
Flower's in-memory grid does, so a run takes seconds instead of a Ray start.
"""

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAvg
from tiny_config import TINY

from flower_medimg.cli import main as cli_main
from flower_medimg.client_apps import make_client_app
from flower_medimg.core.settings import resolve_settings
from flower_medimg.lifecycle import ModelRegistry, verify_audit_log
from flower_medimg.lifecycle.audit import line_hash
from flower_medimg.lifecycle.driver import LifecycleError
from flower_medimg.lifecycle.integrity import KEY_ENV, ServerKey, key_path
from flower_medimg.lifecycle.registry import (
    DB_NAME,
    RegistryError,
    RegistryTamperedError,
    RegistryUnavailableError,
)
from flower_medimg.lifecycle.resume_state import ResumeState, ResumeStateError
from flower_medimg.lifecycle.strategy_state import StrategyStateError
from flower_medimg.server_app import run_experiment
from flower_medimg.strategies.registry import STRATEGIES

NUM_SITES = 2

BASE = {
    **TINY,
    "data.num-sites": NUM_SITES,
    "strategy.name": "fedavg",
    "strategy.min-available-nodes": NUM_SITES,
    "central-eval": False,
    "stats.enabled": False,
    "cross-site.enabled": False,
    "registry.keep": "all",
}


class InProcessGrid:
    """A Grid whose nodes are the real ClientApp, called in this process.

    Parameters
    ----------
    config : dict
        The run config (the ClientApp's overrides).
    before_train : callable, optional
        ``(server_round) -> None``, called before a round's train messages are
        delivered: where a test plants its fault.
    """

    def __init__(self, config, before_train=None):
        self.app = make_client_app(**config)
        self.before_train = before_train
        self.train_rounds = 0
        self.replies = {}
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": NUM_SITES},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, NUM_SITES + 1)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Deliver each message to its node now; return the message ids."""
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_rounds += 1
            if self.before_train is not None:
                self.before_train(self.train_rounds)
        ids = []
        for message in messages:  # a message id, as a grid gives it when it pushes
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            context = self.contexts[message.metadata.dst_node_id]
            self.replies[message_id] = self.app(message, context)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        """Hand over the replies to ``message_ids`` (each once)."""
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


def run_server(config, run_id, before_train=None):
    """Run the ServerApp's experiment once; return the run folder."""
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    grid = InProcessGrid(config, before_train)
    return run_experiment(grid, context, resolve_settings(overrides=config))


def _config(tmp, name, rounds, **extra):
    return {
        **BASE,
        "num-server-rounds": rounds,
        "output-dir": str(tmp / f"out-{name}"),
        "registry.path": str(tmp / f"registry-{name}"),
        **extra,
    }


def _run_dirs(config):
    return sorted(Path(config["output-dir"]).iterdir())


def _server_key():
    return ServerKey.load_or_create(key_path())


def _open(config):
    return ModelRegistry(config["registry.path"], _server_key())


def _model(run_dir):
    return torch.load(run_dir / "global_model.pt", weights_only=True)


def _assert_same_model(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-round run: its final model and its folders."""
    tmp = tmp_path_factory.mktemp("straight")
    config = _config(tmp, "straight", 3)
    summary = run_server(config, run_id=100)
    (run_dir,) = _run_dirs(config)
    return {"config": config, "run_dir": run_dir, "summary": summary}


# ---- 1. planted state --------------------------------------------------------------


class _RunsCode:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _plant(database, version, state_file, payload):
    """As whoever can write the registry folder: plant ``payload`` as the state."""
    state_file.write_bytes(payload)
    with sqlite3.connect(database) as db:
        db.execute("UPDATE runs SET status = 'running'")
        db.execute(
            "UPDATE models SET state_sha256 = ? WHERE id = ?",
            (hashlib.sha256(payload).hexdigest(), version),
        )
    db.close()


def test_planted_pickle_is_refused_and_never_runs(tmp_path, capsys):
    config = _config(tmp_path, "planted", 1)
    run_server(config, run_id=1)
    registry = _open(config)
    (version,) = registry.versions()
    database = registry.database
    state_file = registry.folder / version["state_path"]
    registry.close()
    marker = tmp_path / "owned"
    payload = pickle.dumps(_RunsCode(f"touch {marker}"))
    # the payload is live: unpickled in a separate process, it runs its command
    probe = tmp_path / "probe"
    live = pickle.dumps(_RunsCode(f"touch {probe}"))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle,sys; pickle.loads(sys.stdin.buffer.read())",
        ],
        input=live,
        check=True,
    )
    assert probe.exists()

    _plant(database, version["id"], state_file, payload)
    with pytest.raises(RegistryTamperedError) as refused:
        run_server(config, run_id=2)  # the restart
    message = str(refused.value)
    assert "Refusing to resume" in message
    assert f"model version {version['id']}" in message and str(database) in message
    assert not marker.exists()
    # even read directly, the planted file is refused as no resume state
    with pytest.raises(ResumeStateError, match="not a safetensors file|no resume"):
        ResumeState.from_bytes(payload)
    assert not marker.exists()
    # `registry verify` names both changed records and the state file
    assert cli_main(["registry", "--path", config["registry.path"], "verify"]) == 2
    out = capsys.readouterr().out
    assert "run 1: record not signed" in out
    assert f"version {version['id']}: record not signed" in out
    assert "TAMPERED: 2 problems" in out


def _valid_state():
    return ResumeState(
        round=1,
        strategy=[],
        strategy_arrays={"strategy/0/m_t/0": np.zeros(2, np.float32)},
        stop={"best": None, "best-round": None, "stale-rounds": 0},
        best={"best": 0.5, "best-round": 1},
        recorder={1: {"clients-train": []}},
        history={"train_metrics_clientapp": {1: {"loss": 0.25}}},
    )


def _with_document(change):
    """A safetensors file holding the valid state's JSON after ``change(document)``."""
    data = _valid_state().to_bytes()
    (length,) = np.frombuffer(data[:8], "<u8")
    header = json.loads(data[8 : 8 + int(length)])
    document = json.loads(header["__metadata__"]["state"])
    return safetensors.numpy.save(
        {"strategy/0/m_t/0": np.zeros(2, np.float32)},
        metadata={
            "format": header["__metadata__"]["format"],
            "state": change(document),
        },
    )


def _set(key, value):
    return lambda document: json.dumps({**document, key: value})


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda document: '{"round": 1, "strategy": [', "no resume state"),
        (_set("round", "1"), "field 'round'"),
        (_set("round", True), "field 'round'"),
        (_set("stop", {"best": "x", "best-round": None, "stale-rounds": 0}), "'stop'"),
        (_set("best-version", 1.5), "field 'best-version'"),
        (_set("history", {"__class__": {}}), "field 'history'"),
        (_set("decision", {"round": 1, "reason": 3, "message": ""}), "'decision'"),
        (lambda document: json.dumps({**document, "code": "os.system"}), "'code'"),
        (lambda document: json.dumps([document]), "not a JSON object"),
    ],
    ids=[
        "bad-json",
        "round-str",
        "round-bool",
        "stop-type",
        "best-version",
        "history-key",
        "decision",
        "extra-field",
        "not-object",
    ],
)
def test_malformed_resume_state_is_refused_naming_the_field(change, named):
    assert ResumeState.from_bytes(_valid_state().to_bytes()).round == 1
    with pytest.raises(ResumeStateError, match=named):
        ResumeState.from_bytes(_with_document(change))


def test_signed_but_malformed_state_stops_the_restart_naming_version(tmp_path):
    config = _config(tmp_path, "malformed", 2)

    def crash(server_round):
        if server_round == 2:
            raise RuntimeError("simulated ServerApp crash")

    with pytest.raises(RuntimeError, match="simulated"):
        run_server(config, run_id=1, before_train=crash)
    registry = _open(config)
    (run,) = registry.runs()
    state = _with_document(_set("recorder", [1, 2]))
    version, _ = registry.record_round(  # signed: as if the server wrote it
        run["id"],
        2,
        registry.load_weights(registry.versions()[0]["id"]),
        metrics={},
        contributors=[],
        replies=[],
        epsilon=None,
        resume_state=state,
        best=False,
        keep="all",
        audit_head="0" * 64,
        audit_lines=0,
    )
    registry.close()
    with pytest.raises(RegistryError) as refused:
        run_server(config, run_id=2)
    message = str(refused.value)
    assert f"version {version} of {tmp_path}" in message and DB_NAME in message
    assert "field 'recorder' is malformed" in message


# ---- 2. audit log ------------------------------------------------------------------


def _canonical(entry):
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _rechain(entries, signer=None):
    """Recompute seq, prev and hash of every line, as a forger without the key does.

    ``signer`` (the forger's own key) signs each line whose hash changed; without
    it, the old signatures stay.
    """
    head, lines = "0" * 64, []
    for seq, entry in enumerate(entries):
        entry = {**entry, "seq": seq, "prev": head}
        entry["hash"] = line_hash(entry)
        if signer is not None and entry["hash"] != entries[seq]["hash"]:
            entry["sig"] = signer.sign(entry["hash"].encode())
        head = entry["hash"]
        lines.append(_canonical(entry))
    return b"".join(lines)


@pytest.fixture(scope="module")
def audited(straight):
    """The straight run's audit log: path, its lines and entries, a forger's key."""
    path = straight["run_dir"] / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    forger = ServerKey.load_or_create(
        Path(straight["config"]["output-dir"]).parent / "forger" / "key.pem"
    )
    return path, lines, [json.loads(line) for line in lines], forger


def _first(entries, event):
    return next(i for i, e in enumerate(entries) if e["event"] == event)


def _forged_reply(entries, forger):
    reply = _first(entries, "reply")
    entries = [dict(e) for e in entries]
    entries[reply] = {**entries[reply], "accepted": False, "reason": "forged"}
    return _rechain(entries), reply + 1


def _inserted(entries, forger):
    at = _first(entries, "reply")
    fake = {**entries[at], "node_id": 999, "time": entries[at]["time"]}
    return _rechain(entries[:at] + [fake] + entries[at:], forger), at + 1


def _appended(entries, forger):
    extra = {**entries[-1], "event": "reply", "node_id": 999}
    return _rechain([*entries, extra], forger), len(entries) + 1


def _reordered(entries, forger):
    at = _first(entries, "reply")
    raw = [_canonical(e) for e in entries]
    raw[at], raw[at + 1] = raw[at + 1], raw[at]
    return b"".join(raw), at + 1


@pytest.mark.parametrize(
    ("forge", "why"),
    [
        (_forged_reply, "signature does not verify"),
        (_inserted, "signature does not verify"),
        (_appended, "signature does not verify"),
        (_reordered, "'prev' does not match"),
    ],
    ids=["rechained", "inserted", "appended", "reordered"],
)
def test_forged_audit_log_is_reported_at_its_line(
    audited, tmp_path, capsys, forge, why
):
    path, _, entries, forger = audited
    assert verify_audit_log(path, _server_key()).ok
    data, line = forge(entries, forger)
    forged = tmp_path / "audit.jsonl"
    forged.write_bytes(data)
    check = verify_audit_log(forged, _server_key())
    assert check.status == "tampered" and check.bad_line == line, check.message
    assert f"line {line}: " in check.message and why in check.message
    assert cli_main(["audit", "verify", str(forged)]) == 2
    out = capsys.readouterr().out
    assert f"TAMPERED: line {line}: " in out and why in out


def test_appended_line_signed_by_the_server_key_is_reported(audited, tmp_path):
    # even a line the key signed (a replayed run's line) may not follow run-end
    _, _, entries, _ = audited
    forged = tmp_path / "audit.jsonl"
    forged.write_bytes(_appended(entries, _server_key())[0])
    check = verify_audit_log(forged, _server_key(), anchors=False)
    assert check.bad_line == len(entries) + 1
    assert "after the run-end line (appended)" in check.message


def test_truncated_and_emptied_audit_logs(audited, tmp_path, capsys):
    _, lines, _, _ = audited
    cut = tmp_path / "audit.jsonl"
    cut.write_bytes(b"".join(lines[:-1]))  # the run-end line is gone
    alone = verify_audit_log(cut, _server_key(), anchors=False)
    assert alone.status == "incomplete" and "no run-end line" in alone.message
    anchored = verify_audit_log(cut, _server_key())
    assert anchored.status == "tampered"
    assert f"records {len(lines)} lines: the log was truncated" in anchored.message
    assert cli_main(["audit", "verify", str(cut)]) == 2
    assert cli_main(["audit", "verify", "--no-registry", str(cut)]) == 3
    assert "INCOMPLETE" in capsys.readouterr().out

    cut.write_bytes(b"")
    empty = verify_audit_log(cut, _server_key(), anchors=False)
    assert empty.status == "tampered" and "empty" in empty.message
    cut.write_bytes(b"".join(lines[1:]))  # the head is cut off
    headless = verify_audit_log(cut, _server_key(), anchors=False)
    assert headless.bad_line == 1 and "'prev'" in headless.message


def test_audit_cli_needs_only_the_path(audited, tmp_path):
    """``python -m flower_medimg.cli audit verify PATH`` with the key where it lives."""
    path, _, entries, forger = audited
    home = tmp_path / "home"
    (home / ".flower-medimg").mkdir(parents=True)
    for suffix in ("", ".pub"):  # the key at its default location, nowhere else
        source = Path(str(key_path()) + suffix)
        shutil.copy(source, home / ".flower-medimg" / f"server_ed25519.pem{suffix}")
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    env["HOME"] = str(home)
    command = [sys.executable, "-m", "flower_medimg.cli", "audit", "verify"]
    clean = subprocess.run(
        [*command, str(path)], env=env, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    assert "OK" in clean.stdout and "head matches the registry" in clean.stdout
    forged = tmp_path / "audit.jsonl"
    data, line = _forged_reply(entries, forger)
    forged.write_bytes(data)
    caught = subprocess.run(
        [*command, str(forged)], env=env, capture_output=True, text=True
    )
    assert caught.returncode == 2
    assert f"TAMPERED: line {line}: signature does not verify" in caught.stdout


# ---- 3 and 4. a locked registry, a full disk -----------------------------------------


def _assert_outputs_of_round(run_dir, last_round):
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == list(range(1, last_round + 1))
    assert (run_dir / "global_model.pt").stat().st_size > 0


def _assert_resumes_to_the_straight_model(config, straight, recorded_round):
    """Restart; check it resumed after ``recorded_round`` and matches ``straight``."""
    run_server(config, run_id=2)
    registry = _open(config)
    first, second = registry.runs()
    assert first["status"] == "resumed" and second["status"] == "finished"
    assert [v["round"] for v in registry.versions(second["id"])] == list(
        range(recorded_round + 1, 4)
    )
    assert registry.verify() == []
    registry.close()
    resumed_dir = _run_dirs(config)[1]
    _assert_outputs_of_round(resumed_dir, 3)
    _assert_same_model(_model(resumed_dir), _model(straight["run_dir"]))
    assert verify_audit_log(resumed_dir / "audit.jsonl", _server_key()).ok


def test_registry_locked_past_the_retry_window_loses_no_round(tmp_path, straight):
    config = _config(tmp_path, "locked", 3, **{"registry.lock-timeout": 0.5})
    database = Path(config["registry.path"]) / DB_NAME
    holder = []

    def lock(server_round):  # another process holds the database from round 2 on
        if server_round == 2:
            other = sqlite3.connect(database, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            holder.append(other)

    with pytest.raises(LifecycleError) as stopped:
        run_server(config, run_id=1, before_train=lock)
    holder[0].rollback()
    holder[0].close()
    message = str(stopped.value)
    assert "round 2 could not be recorded" in message and str(database) in message
    assert "still locked after retrying for 0.5 s" in message
    assert "resumes after round 1" in message
    (run_dir,) = _run_dirs(config)
    _assert_outputs_of_round(run_dir, 2)  # round 2's model reached the run folder
    registry = _open(config)
    (run,) = registry.runs()
    assert run["status"] == "running"
    assert [v["round"] for v in registry.versions()] == [1]
    assert sorted(p.name for p in (registry.folder / "states").iterdir()) == [
        "run1-round1.safetensors"
    ]  # round 2's files were removed with its failed record
    registry.close()
    events = [json.loads(x)["event"] for x in (run_dir / "audit.jsonl").open()]
    assert "registry-unavailable" in events and events[-1] == "run-end"

    _assert_resumes_to_the_straight_model(config, straight, recorded_round=1)


def test_full_disk_stops_cleanly_and_resumes(tmp_path, straight, monkeypatch):
    config = _config(tmp_path, "full", 3)
    models = Path(config["registry.path"]).resolve() / "models"
    real_fsync = os.fsync

    def full_fsync(fd):  # the disk fills while round 3's weights are flushed
        if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{models}/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    def fill_disk(server_round):
        if server_round == 3:
            monkeypatch.setattr(os, "fsync", full_fsync)

    with pytest.raises(LifecycleError) as stopped:
        run_server(config, run_id=1, before_train=fill_disk)
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    message = str(stopped.value)
    assert f"cannot write {models / 'run1-round3.safetensors'}" in message
    assert "No space left on device" in message
    (run_dir,) = _run_dirs(config)
    _assert_outputs_of_round(run_dir, 3)
    registry = _open(config)
    assert [v["round"] for v in registry.versions()] == [1, 2]
    assert not list(models.glob("*round3*")) and not list(models.glob(".*"))
    registry.close()

    _assert_resumes_to_the_straight_model(config, straight, recorded_round=2)


def _record(registry, run, server_round, replies):
    return registry.record_round(
        run,
        server_round,
        {"w": torch.full((4,), float(server_round))},
        metrics={"central/dice": 0.5},
        contributors=[1],
        replies=replies,
        epsilon=None,
        resume_state=b"state %d" % server_round,
        best=False,
        keep="all",
        audit_head=f"{server_round:064x}",
        audit_lines=server_round,
    )


def test_sqlite_full_records_nothing_of_the_round(tmp_path):
    registry = ModelRegistry(tmp_path / "reg", _server_key())
    run = registry.start_run(
        flower_run_id=1,
        experiment="e",
        run_dir=tmp_path,
        strategy="fedavg",
        config={},
    )
    first, _ = _record(registry, run, 1, [])
    pages = registry._db.execute("PRAGMA page_count").fetchone()["page_count"]
    registry._db.execute(f"PRAGMA max_page_count = {pages}")  # the file cannot grow
    replies = [{"node_id": n, "reason": "x" * 64} for n in range(200)]  # > 1 page
    with pytest.raises(RegistryUnavailableError) as full:
        _record(registry, run, 2, replies)
    assert str(registry.database) in str(full.value)
    assert "database or disk is full" in str(full.value)
    assert [v["round"] for v in registry.versions()] == [1]
    assert registry.resumable("e")["id"] == first
    assert not list((registry.folder / "states").glob("*round2*"))
    registry._db.execute(f"PRAGMA max_page_count = {2**30}")  # space freed
    second, _ = _record(registry, run, 2, replies)
    assert registry.resumable("e")["id"] == second
    assert registry.load_resume_state(second) == b"state 2"
    registry.close()


# ---- 5. a corrupt database file ----------------------------------------------------


def test_corrupt_database_is_named_by_the_api_the_cli_and_the_server(tmp_path, capsys):
    folder = tmp_path / "registry"
    folder.mkdir()
    database = folder / DB_NAME
    database.write_bytes(random.Random(0).randbytes(8192))
    for read_only in (False, True):
        with pytest.raises(RegistryError, match="file is not a database") as err:
            ModelRegistry(folder, _server_key(), read_only=read_only)
        assert str(database) in str(err.value)
    for action in (["list"], ["verify"], ["show", "1"]):
        assert cli_main(["registry", "--path", str(folder), *action]) == 1
        captured = capsys.readouterr()
        assert f"flower-medimg: error: Registry {database}" in captured.err
        assert "Traceback" not in captured.err + captured.out
    config = _config(tmp_path, "corrupt", 1, **{"registry.path": str(folder)})
    with pytest.raises(RegistryError, match=str(database)):
        run_server(config, run_id=1)
    listing = subprocess.run(
        [sys.executable, "-m", "flower_medimg.cli", "registry", "--path", str(folder)]
        + ["list"],
        capture_output=True,
        text=True,
    )
    assert listing.returncode == 1
    assert str(database) in listing.stderr and "Traceback" not in listing.stderr


class _UndescribedFedAvg(FedAvg):
    """A user's strategy whose state STATE_FIELDS does not describe."""


def test_undescribed_strategy_is_refused_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "undescribed", _UndescribedFedAvg)
    config = _config(tmp_path, "custom", 1, **{"strategy.name": "undescribed"})
    trained = []
    with pytest.raises(StrategyStateError, match=r"_UndescribedFedAvg.*registry.path"):
        run_server(config, 77, before_train=trained.append)
    assert trained == []  # refused before the first round
    # without the registry the same strategy runs
    config["registry.path"] = ""
    summary = run_server(config, 78)
    assert [entry["round"] for entry in summary["rounds"]] == [1]
