"""End to end in Flower's own runtimes: the Ray simulation engine and `flwr run .`."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.simulation import run_simulation
from tiny_config import TINY as TINY_SEGMENTATION

from flower_medimg.client_apps import make_client_app
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.lifecycle.outputs import load_global_model
from flower_medimg.server_app import make_server_app

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    **TINY_SEGMENTATION,
    "num-server-rounds": 2,
    "strategy.min-available-nodes": 3,  # round 1 waits for every site
}


@pytest.mark.slow
def test_ray_simulation_three_sites_two_rounds(tmp_path):
    config = {**TINY, "output-dir": str(tmp_path), "train.report-losses": True}
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_client_app(**config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for entry in summary["rounds"]:
        assert len(entry["clients-train"]) == 3
        assert len(entry["clients-evaluate"]) == 3
        assert 0.0 <= entry["evaluate"]["dice"] <= 1.0
        assert 0.0 <= entry["central"]["dice"] <= 1.0
        assert 0.0 <= entry["central"]["unseen-dice"] <= 1.0  # a scanner no site has
        assert entry["train"]["train-loss-after"] < entry["train"]["train-loss-before"]
        assert entry["wall-time-s"] > 0
    sizes = {c["num-examples"] for c in summary["rounds"][0]["clients-train"]}
    assert all(isinstance(n, int) and n > 0 for n in sizes)
    assert "dice" in summary["central-initial"]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "evaluate/dice" in header and "central/hd95" in header

    # the global model changed and loads straight into the MONAI network
    model = load_global_model(run_dir)
    torch.manual_seed(0)
    initial = model_from_settings(resolve_settings(overrides=config)).state_dict()
    final = model.state_dict()
    assert initial.keys() == final.keys()
    assert any(not torch.equal(initial[k], final[k]) for k in initial)


def _kill_superlink(flwr_home: Path) -> None:
    """Stop the local SuperLink that `flwr run` started under this FLWR_HOME."""
    found = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*{flwr_home}"],
        capture_output=True,
        text=True,
        check=False,
    )
    for pid in found.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)


@pytest.mark.slow
def test_flwr_run_cli(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "out"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        # use this environment, as the README says, not a fresh venv per run
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39191",
        "FLWR_LOCAL_CONTROL_API_PORT": "39193",
    }
    overrides = " ".join(
        f"{k}={json.dumps(v)}" for k, v in {**TINY, "output-dir": str(out)}.items()
    )
    flwr = Path(sys.executable).with_name("flwr")
    try:
        proc = subprocess.run(
            [
                str(flwr),
                "run",
                ".",
                "--stream",
                "--run-config",
                overrides,
                "--federation-config",
                "num-supernodes=3",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
    finally:
        _kill_superlink(flwr_home)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    run_dirs = list(out.iterdir())
    assert len(run_dirs) == 1, log[-4000:]
    assert (run_dirs[0] / "global_model.pt").exists()
    summary = json.loads((run_dirs[0] / "metrics.json").read_text())
    assert len(summary["rounds"]) == 2
    model = load_global_model(run_dirs[0])
    saved = torch.load(run_dirs[0] / "global_model.pt", weights_only=True)
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.slow
def test_nan_site_is_dropped_by_the_gate_and_the_model_stays_finite(tmp_path, caplog):
    config = {
        **TINY,
        "output-dir": str(tmp_path),
        "attack.kind": "nan",
        "attack.sites": "1",
        "strategy.name": "fedavg",  # Flower's own FedAvg, behind the quality gate
    }
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_client_app(**config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "metrics.json").read_text())
    for entry in summary["rounds"]:
        assert entry["train"]["gate-rejected"] == 1
        assert entry["train"]["gate-accepted"] == 2
        assert 0.0 <= entry["central"]["dice"] <= 1.0
    state = torch.load(run_dir / "global_model.pt")
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    # rejected for its NaN values (a crashed attacker would be an error reply)
    assert "arrays contain non-finite values" in caplog.text
    assert "Received error in reply" not in caplog.text
