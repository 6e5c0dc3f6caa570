"""End to end in Flower's deployment runtime: a secure federation on 127.0.0.1.

One federation (SuperLink with TLS and SuperNode authentication, three SuperNodes
with synthetic site folders on disk) is brought up by `flower_medimg.federation.up`
for the whole module and always brought down again by PID. Runs are submitted with
`flwr run . <connection> --stream`, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_config import TINY as TINY_SEGMENTATION

from flower_medimg.federation import (
    Federation,
    add_site,
    down,
    status,
    up,
    wait_for_nodes,
)
from flower_medimg.federation.flwr_cli import list_nodes
from flower_medimg.federation.launcher import start_supernode
from flower_medimg.federation.processes import is_running, stop_process
from flower_medimg.lifecycle.outputs import load_global_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).with_name("flwr"))
TINY = {**TINY_SEGMENTATION, "central-eval": False}


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    root = tmp_path_factory.mktemp("deployment")
    try:
        fed = up(
            root / "federation",
            3,
            flwr_home=root / "flwr-home",
            data_options={"image_size": 32, "samples_per_site": 12},
        )
        yield fed
    finally:
        if (root / "federation" / "federation.json").exists():
            down(root / "federation", grace=5)


def _overrides(values: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _flwr_run_command(fed: Federation, run_config: dict) -> list[str]:
    return [
        FLWR,
        "run",
        ".",
        fed.connection,
        "--stream",
        "--run-config",
        _overrides(run_config),
    ]


def _env(fed: Federation) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": fed.flwr_home}


def _flwr_run(fed: Federation, run_config: dict, timeout: float = 420) -> str:
    proc = subprocess.run(
        _flwr_run_command(fed, run_config),
        cwd=ROOT,
        env=_env(fed),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _summary(out: Path) -> tuple[Path, dict]:
    (run_dir,) = out.iterdir()
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _online(fed: Federation) -> set[int]:
    nodes = list_nodes(fed.connection, Path(fed.flwr_home))
    return {n["node-id"] for n in nodes if n["status"] == "online"}


def _wait_exit(record, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(record):
            return True
        time.sleep(0.5)
    return False


def test_secure_run_three_sites(federation, tmp_path):
    """TLS + node auth: `flwr run` of our app finishes and writes the global model."""
    fed = federation
    assert fed.address.startswith("127.0.0.1:")
    assert {s.node_id for s in fed.sites} <= _online(fed)
    for name in ("superlink", "supernode-site-0"):
        argv = fed.process(name).argv
        assert "--insecure" not in argv
    assert "--enable-supernode-auth" in fed.process("superlink").argv

    out = tmp_path / "out"
    log = _flwr_run(fed, {**TINY, "num-server-rounds": 2, "output-dir": str(out)})
    run_dir, summary = _summary(out)
    assert (run_dir / "global_model.pt").exists()
    assert load_global_model(run_dir) is not None
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert len(entry["clients-train"]) == 3, log[-3000:]
        assert len(entry["clients-evaluate"]) == 3
    assert "Received 3 results and 0 failures" in log
    # each ClientApp trained on its own folder: the sizes reported are the folders'
    folder_sizes = sorted(
        len(json.loads((Path(s.data_dir) / "dataset.json").read_text())["training"])
        for s in fed.sites
    )
    reported = sorted(c["num-examples"] for c in summary["rounds"][0]["clients-train"])
    assert reported == folder_sizes


def test_superlink_speaks_tls_with_the_federation_ca(federation):
    """The SuperLink's port does a TLS handshake verified by the federation's CA."""
    fed = federation
    host, port = fed.address.rsplit(":", 1)
    trusted = ssl.create_default_context(cafile=fed.ca_cert)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        trusted.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.getpeercert()["subjectAltName"]
    untrusted = ssl.create_default_context()  # system CAs only
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection((host, int(port)), timeout=10) as raw,
        untrusted.wrap_socket(raw, server_hostname=host),
    ):
        pass


def test_unregistered_key_is_refused(federation, tmp_path):
    """A SuperNode whose public key was never registered cannot join."""
    fed = federation
    before = _online(fed)
    intruder = add_site(
        fed, "intruder", fed.sites[0].data_dir, register=False, start=False
    )
    record = start_supernode(fed, intruder, max_retries=2)
    assert _wait_exit(record), "an unregistered SuperNode kept running"
    log = Path(record.log).read_text()
    assert "Failed to initialize the connection to the SuperLink" in log
    assert "Failed to activate SuperNode" in log
    # the registered sites are unaffected and nothing new appeared
    assert _online(fed) == before
    assert {s.node_id for s in fed.sites if s.name.startswith("site-")} <= before


def test_plaintext_client_cannot_connect(federation, tmp_path):
    """A SuperNode without TLS cannot talk to the TLS SuperLink."""
    fed = federation
    before = _online(fed)
    plain = add_site(
        fed, "plaintext", fed.sites[0].data_dir, register=False, start=False
    )
    record = start_supernode(fed, plain, insecure=True, max_retries=2)
    assert "--insecure" in record.argv
    assert _wait_exit(record), "a plaintext SuperNode kept running"
    log = Path(record.log).read_text()
    assert "Failed to initialize the connection to the SuperLink" in log
    assert _online(fed) == before


def test_wrong_data_dir_fails_alone(federation, tmp_path):
    """A site whose data-dir is wrong replies with an error naming the folder."""
    fed = federation
    missing = tmp_path / "no-such-site-folder"
    bad = add_site(fed, "site-wrong-dir", missing)
    wait_for_nodes(fed, [bad.node_id])
    out = tmp_path / "out"
    try:
        log = _flwr_run(fed, {**TINY, "num-server-rounds": 1, "output-dir": str(out)})
    finally:
        stop_process(fed.process("supernode-site-wrong-dir"), grace=5)
    _, summary = _summary(out)
    (round1,) = summary["rounds"]
    assert len(round1["clients-train"]) == 3, log[-3000:]
    # the reply screening drops the error reply, naming the node and the folder,
    # before the strategy counts what is left
    rejected = f"Rejected train reply from node {bad.node_id}: error reply"
    assert rejected in log, log[-3000:]
    assert str(missing) in log
    assert "Received 3 results and 0 failures" in log


def test_site_killed_mid_run(federation, tmp_path):
    """A SuperNode killed (SIGKILL) in round 2 of 3: the run ends with the others.

    The SuperLink notices the dead SuperNode when it misses its heartbeat window
    (2 x 30 s in Flower 1.42) and answers the round's message for it with a
    "Node Unavailable" error, which FedAvg counts as a failure and skips; later
    rounds sample only online nodes. `round-timeout` (90 s) is above both that
    window and the live sites' training time on a loaded 2-core machine. Flower
    logs that error with the SuperLink's id, not the site's; our ServerApp names
    the node that gave no valid reply, and `flower_medimg.federation.status` maps
    node ids to site names.
    """
    fed = federation
    victim = fed.site("site-2")
    victim_proc = fed.process("supernode-site-2")
    assert is_running(victim_proc)
    out = tmp_path / "out"
    run_config = {
        **TINY,
        "num-server-rounds": 3,
        "round-timeout": 90.0,
        "strategy.min-available-nodes": 2,
        "strategy.min-train-nodes": 2,
        "strategy.min-evaluate-nodes": 2,
        "output-dir": str(out),
    }
    proc = subprocess.Popen(
        _flwr_run_command(fed, run_config),
        cwd=ROOT,
        env=_env(fed),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    round2 = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "[ROUND 2/3]" in line:
                round2.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert round2.wait(300), "".join(lines)[-3000:]
        assert is_running(victim_proc)
        os.kill(victim_proc.pid, signal.SIGKILL)
        assert _wait_exit(victim_proc, 10)
        returncode = proc.wait(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    log = "".join(lines)
    (tmp_path / "flwr-run.log").write_text(log)
    assert returncode == 0, log[-4000:]
    _, summary = _summary(out)
    trained = [len(r["clients-train"]) for r in summary["rounds"]]
    assert trained == [3, 2, 2], (trained, log[-3000:])
    # the screening drops the SuperLink's error reply (sent with its own id)
    rejected = r"Rejected train reply from node \d+: error reply .*Node Unavailable"
    assert re.search(rejected, log), log[-3000:]
    assert "Node Unavailable" in log
    assert f"No valid train reply from node(s) [{victim.node_id}]" in log, log[-3000:]
    sites = status(fed.folder)["sites"]
    assert sites["site-2"]["status"] == "offline", sites
    assert sites["site-2"]["node-id"] == victim.node_id
    assert sites["site-0"]["status"] == sites["site-1"]["status"] == "online"
