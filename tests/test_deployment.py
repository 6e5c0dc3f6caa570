"""End to end in Flower's deployment runtime: a secure federation on 127.0.0.1.

One federation (SuperLink with TLS and SuperNode authentication, three SuperNodes
with synthetic site folders on disk) is brought up by `flower_medimg.federation.up`
for the whole module and always brought down again by PID. Runs are submitted with
`flwr run . <connection> --stream`, as a user would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from tiny_config import TINY as TINY_SEGMENTATION

from flower_medimg.data.cache import CACHE_FOLDER, TRANSFORMED_LOG
from flower_medimg.federation import (
    Federation,
    add_site,
    down,
    status,
    up,
    wait_for_nodes,
)
from flower_medimg.federation.flwr_cli import list_nodes, write_connection
from flower_medimg.federation.keys import write_node_keys
from flower_medimg.federation.launcher import start_supernode
from flower_medimg.lifecycle.outputs import load_global_model
from flower_medimg.site.config import load_site_config
from flower_medimg.site.processes import command_line, is_running
from flower_medimg.site.runtime import MESSAGES_LOG, RUNTIME_FOLDER, read_runtime_state
from flower_medimg.site.service import site_processes, stop_site

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
            approve=[ROOT],  # the project's app, as each hospital approves it
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


@contextlib.contextmanager
def _flwr_run_in_background(fed: Federation, run_config: dict):
    """Start `flwr run --stream`; yield it and its output lines as they arrive.

    On leaving, a run still going is killed and the reader of its output joined.
    """
    proc = subprocess.Popen(
        _flwr_run_command(fed, run_config),
        cwd=ROOT,
        env=_env(fed),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)


def _wait_for_line(proc, lines: list[str], text: str, timeout: float) -> bool:
    """Wait until a line of the run's output holds ``text``; False if it never does."""
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        if time.monotonic() > deadline or proc.poll() is not None:
            return any(text in line for line in lines)
        time.sleep(0.05)
    return True


UNAPPROVED_APP = {
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probeapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "probeapp.server:app"
clientapp = "probeapp.client:app"

[tool.flwr.app.config]
out = ""
""",
    "probeapp/__init__.py": "",
    "probeapp/server.py": """import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes = []
    while len(nodes) < 3:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                message_type="query")
        for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=120)
    reasons = [r.error.reason if r.has_error() else "ok" for r in replies]
    Path(context.run_config["out"]).write_text(json.dumps(reasons))
""",
    "probeapp/client.py": """from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg, context):
    Path(str(context.run_config["out"]) + ".ran-at-a-site").touch()
    return Message(RecordDict(), reply_to=msg)
""",
}


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


def test_secure_run_three_sites_while_a_wrong_data_dir_fails_alone(
    federation, tmp_path
):
    """TLS + node auth: `flwr run` of our app finishes and writes the global model.

    A fourth site whose data-dir is wrong joins the run; it replies with an error
    naming the folder, which the reply screening drops, and costs only itself.
    """
    fed = federation
    assert fed.address.startswith("127.0.0.1:")
    assert {s.node_id for s in fed.sites} <= _online(fed)
    for name in ("superlink", "supernode-site-0"):
        argv = fed.process(name).argv
        assert "--insecure" not in argv
    assert "--enable-supernode-auth" in fed.process("superlink").argv
    missing = tmp_path / "no-such-site-folder"
    bad = add_site(fed, "site-wrong-dir", missing, approve=[ROOT])
    wait_for_nodes(fed, [bad.node_id])

    out = tmp_path / "out"
    try:
        log = _flwr_run(fed, {**TINY, "num-server-rounds": 2, "output-dir": str(out)})
    finally:
        stop_site(bad.state_dir, grace=5)
    run_dir, summary = _summary(out)
    assert (run_dir / "global_model.pt").exists()
    assert load_global_model(run_dir) is not None
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert len(entry["clients-train"]) == 3, log[-3000:]
        assert len(entry["clients-evaluate"]) == 3
    assert "Received 3 results and 0 failures" in log
    # the reply screening drops the error reply, naming the node and the folder,
    # before the strategy counts what is left
    rejected = f"Rejected train reply from node {bad.node_id}: error reply"
    assert rejected in log, log[-3000:]
    assert str(missing) in log
    # each ClientApp trained on its own folder: the sizes reported are the folders'
    folder_sizes = sorted(
        len(json.loads((Path(s.data_dir) / "dataset.json").read_text())["training"])
        for s in fed.sites[:3]
    )
    reported = sorted(c["num-examples"] for c in summary["rounds"][0]["clients-train"])
    assert reported == folder_sizes


def _worker_children(state_dir: str) -> list[int]:
    worker = read_runtime_state(state_dir).get("worker")
    if not worker:
        return []
    path = Path(f"/proc/{worker}/task/{worker}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def _messages(site) -> list[dict]:
    log = Path(site.state_dir) / RUNTIME_FOLDER / MESSAGES_LOG
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_site_runtime_runs_messages_warm_and_survives_a_crash(federation, tmp_path):
    """Warm runtime: data transformed once per site, a killed message costs itself.

    During round 1, one site's message process is killed (SIGKILL). The runtime
    replies with an error for it at once and serves round 2 normally.
    """
    fed = federation
    site = fed.site("site-1")
    assert "--isolation" in fed.process("supernode-site-1").argv
    assert "process" in fed.process("supernode-site-1").argv
    before = len(_messages(site))  # the module's earlier runs
    out = tmp_path / "out"
    run_config = {**TINY, "num-server-rounds": 2, "output-dir": str(out)}
    killed: list[int] = []
    with _flwr_run_in_background(fed, run_config) as (proc, lines):
        deadline = time.monotonic() + 240
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            if any("[ROUND 1/2]" in line for line in lines):
                for pid in _worker_children(site.state_dir):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.02)
        returncode = proc.wait(timeout=420)
    log = "".join(lines)
    assert killed, log[-3000:]
    assert returncode == 0, log[-4000:]
    _, summary = _summary(out)
    trained = [len(r["clients-train"]) for r in summary["rounds"]]
    assert trained[1] == 3, (trained, log[-3000:])  # the site came back at once
    records = _messages(site)[before:]
    crashed = [r for r in records if r["pid"] in killed]
    assert crashed and crashed[0]["exit"] == "signal SIGKILL"
    runtime_log = Path(fed.process("site-runtime-site-1").log).read_text()
    assert "ended without a reply (signal SIGKILL)" in runtime_log
    # every site transformed each of its images once in this module's runs
    for s in fed.sites[:3]:
        (cache,) = (Path(s.state_dir) / CACHE_FOLDER).iterdir()
        datalist = json.loads((Path(s.data_dir) / "dataset.json").read_text())
        items = len(datalist["training"]) + len(datalist["validation"])
        assert len((cache / TRANSFORMED_LOG).read_text().splitlines()) == items
    # start-up per message, as the ClientApp measured it, is reported
    startups = [c["startup-s"] for r in summary["rounds"] for c in r["clients-train"]]
    assert all(0 <= s < 60 for s in startups)
    # so is the peak memory of the process that ran it (torch alone is > 100 MiB)
    replies = [c for r in summary["rounds"] for c in r["clients-evaluate"]]
    assert replies and all(c["peak-rss-mib"] > 100 for c in replies)


def test_the_sites_split_this_machines_cores(federation):
    """Three sites on one machine: each site's message processes get their share."""
    share = max(1, (os.cpu_count() or 1) // 3)
    for site in federation.sites[:3]:
        assert load_site_config(site.config).threads == share
        runtime = federation.process(f"site-runtime-{site.name}").argv
        assert runtime[runtime.index("--threads") + 1] == str(share)


def test_stopping_a_site_stops_every_process_it_started(federation, tmp_path):
    """`site stop` ends the SuperNode, the supervisor, the worker, the children."""
    fed = federation
    extra = add_site(fed, "extra-site", fed.sites[0].data_dir)
    wait_for_nodes(fed, [extra.node_id])
    runtime = read_runtime_state(extra.state_dir)
    pids = [p.pid for p in site_processes(extra.state_dir)]
    pids += [runtime["supervisor"], runtime["worker"]]
    assert all(command_line(pid) for pid in pids)
    # the supervisor restarts a worker that dies
    os.kill(runtime["worker"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while read_runtime_state(extra.state_dir).get("worker") in (
        runtime["worker"],
        None,
    ):
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.2)
    restarted = read_runtime_state(extra.state_dir)
    assert restarted["restarts"] == 1
    pids.append(restarted["worker"])
    outcome = stop_site(extra.state_dir, grace=5)
    assert all(what in ("terminated", "killed") for what in outcome.values()), outcome
    assert [pid for pid in pids if command_line(pid)] == []


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
    assert {s.node_id for s in fed.sites[:3]} <= before


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


def test_an_unapproved_app_is_refused_before_its_code_runs(federation, tmp_path):
    """An app no site approved gets an error reply naming its hash; none of it runs."""
    from flwr.cli.build import build_fab_from_disk

    from flower_medimg.site.audit import SITE_AUDIT_LOG, verify_chain

    fed = federation
    app = tmp_path / "probeapp"
    for name, text in UNAPPROVED_APP.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    digest = hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    out = tmp_path / "reasons.json"
    proc = subprocess.run(
        [
            FLWR,
            "run",
            str(app),
            fed.connection,
            "--stream",
            "--run-config",
            f"out={json.dumps(str(out))}",
        ],
        env=_env(fed),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.exists(), (proc.stdout + proc.stderr)[-3000:]
    reasons = json.loads(out.read_text())
    assert len(reasons) == 3
    for reason in reasons:
        assert "refused by the site" in reason and f"FAB hash {digest}" in reason
    assert not Path(str(out) + ".ran-at-a-site").exists()
    for site in fed.sites[:3]:
        state = Path(site.state_dir)
        refused = [m for m in _messages(site) if m["exit"] == "refused"]
        assert refused, site.name
        assert verify_chain(state / SITE_AUDIT_LOG)[0] is None
        events = [json.loads(line) for line in (state / SITE_AUDIT_LOG).open()]
        assert any(
            e["event"] == "refuse" and e["fab_hash"] == digest for e in events
        ), site.name


def _flwr_cli(home: str | Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``flwr *args`` with ``FLWR_HOME=home`` (whose connections it uses)."""
    return subprocess.run(
        [FLWR, *args],
        cwd=ROOT,
        env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_outsider_with_the_ca_certificate_cannot_reach_the_control_api(
    federation, tmp_path
):
    """The outsider sequence of the threat model fails at every step.

    With only the public ``ca.crt`` and the address hospitals reach, an outsider
    tries to register a key of its own, unregister a hospital, submit a run and
    list runs. The front proxy answers each Control API request with 403 (its
    access log names the missing client certificate); the hospitals stay online.
    """
    fed = federation
    before = _online(fed)
    home = tmp_path / "outsider-home"
    write_connection("outsider", fed.address, Path(fed.ca_cert), home)
    key = write_node_keys(tmp_path / "outsider-keys", "outsider")
    victim = fed.sites[0].node_id
    attempts = {
        "register-node": ("supernode", "register", str(key.public_key), "outsider"),
        "unregister-node": ("supernode", "unregister", str(victim), "outsider"),
        "start-run": ("run", str(ROOT), "outsider"),
        "list-runs": ("ls", "outsider"),
    }
    for endpoint, args in attempts.items():
        proc = _flwr_cli(home, *args)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, (endpoint, output[-2000:])
        assert "403" in output, (endpoint, output[-2000:])
    access = (Path(fed.folder) / "control-plane/front/access.log").read_text()
    for endpoint in attempts:
        line = f'"POST /v1/control/{endpoint} HTTP/1.1" 403 client_cert=NONE'
        assert line in access, (endpoint, access[-2000:])
    assert _online(fed) == before
    assert victim in {
        n["node-id"] for n in list_nodes(fed.connection, Path(fed.flwr_home))
    }


def _post_status(url: str, ca: str, cert: tuple[str, str] | None = None) -> int:
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    with httpx.Client(verify=context, timeout=30) as client:
        headers = {"content-type": "application/protobuf"}
        return client.post(url, content=b"", headers=headers).status_code


def test_only_the_operator_certificate_opens_the_control_api(federation):
    """mTLS at the front: the operator's certificate passes; nothing else does.

    The SuperLink's own certificate (server authentication only) is refused as a
    client certificate (400, "unsuitable certificate purpose"), the Runtime API is
    not served at the front at all, and the SuperLink itself listens on loopback.
    """
    fed = federation
    tls = fed.tls
    url = f"https://{fed.address}"
    operator = (tls["operator_cert"], tls["operator_key"])
    server = (tls["server_cert"], tls["server_key"])
    assert _post_status(url + "/v1/control/list-runs", tls["ca_cert"], operator) == 200
    assert _post_status(url + "/v1/control/list-runs", tls["ca_cert"]) == 403
    assert _post_status(url + "/v1/control/list-runs", tls["ca_cert"], server) == 400
    assert _post_status(url + "/v1/runtime/get-run", tls["ca_cert"], operator) == 403
    access = (Path(fed.folder) / "control-plane/front/access.log").read_text()
    assert "client_cert=FAILED:unsuitable certificate purpose" in access
    superlink = fed.process("superlink").argv
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1"
    assert fed.superlink_address.startswith("127.0.0.1:")
    assert fed.control_address.startswith("127.0.0.1:")


def test_the_operator_runs_lists_and_stops_a_run_through_the_gateway(
    federation, tmp_path
):
    """The operator's `flwr` connection (the gateway) can start, list and stop."""
    fed = federation
    out = tmp_path / "out"
    run_config = {**TINY, "num-server-rounds": 50, "output-dir": str(out)}
    command = [c for c in _flwr_run_command(fed, run_config) if c != "--stream"]
    started = _flwr_cli(fed.flwr_home, *command[1:], "--format", "json")
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = int(json.loads(started.stdout)["run-id"])
    listed = _flwr_cli(fed.flwr_home, "ls", fed.connection, "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert run_id in [int(r["run-id"]) for r in json.loads(listed.stdout)["runs"]]
    stopped = _flwr_cli(
        fed.flwr_home, "stop", str(run_id), fed.connection, "--format", "json"
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    access = (Path(fed.folder) / "control-plane/front/access.log").read_text()
    operator = 'client_cert=SUCCESS "CN=flower-medimg operator'
    for endpoint in ("start-run", "list-runs", "stop-run"):
        assert f'"POST /v1/control/{endpoint} HTTP/1.1" 200 {operator}' in access


def test_keys_and_site_folders_are_private(federation):
    """Private keys 0600; key, TLS, site data and state folders 0700."""
    fed = federation
    root = Path(fed.folder)
    for key in [*(root / "tls").glob("*.key"), *(root / "keys").glob("*.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    folders = [root / "tls", root / "keys"]
    for site in fed.sites[:3]:
        folders += [Path(site.data_dir), Path(site.state_dir)]
        data_files = [p for p in Path(site.data_dir).rglob("*") if p.is_file()]
        assert data_files
        for file in data_files:
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_secure_aggregation_through_the_superlink(federation, tmp_path):
    """SecAgg+ across the three sites: the server unmasks only their sum.

    Key advertisement, key sharing and unmasking are extra train messages through
    the SuperLink; each site's warm runtime runs them like any message.
    """
    fed = federation
    out = tmp_path / "out"
    run_config = {
        **TINY,
        "num-server-rounds": 2,
        "output-dir": str(out),
        "secagg.enabled": True,
        "gate.update-norm-factor": 0.0,
        "gate.min-cosine": -1.0,
    }
    log = _flwr_run(fed, run_config)
    _, summary = _summary(out)
    for entry in summary["rounds"]:
        assert len(entry["clients-train"]) == 3, log[-3000:]
        assert all("secagg-clipped" in c for c in entry["clients-train"])
    assert log.count("unmasked the sum of 3 sites (0 dropped") == 2, log[-3000:]


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
    with _flwr_run_in_background(fed, run_config) as (proc, lines):
        assert _wait_for_line(proc, lines, "[ROUND 2/3]", 300), "".join(lines)[-3000:]
        assert is_running(victim_proc)
        os.kill(victim_proc.pid, signal.SIGKILL)
        assert _wait_exit(victim_proc, 10)
        returncode = proc.wait(timeout=480)
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
