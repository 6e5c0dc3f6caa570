"""The lifecycle in Flower's Ray simulation runtime: statistics, stop rule,
registry, audit log, cross-site matrix, and resume after a ServerApp crash."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from tiny_config import TINY

from flower_medimg.client_apps import make_client_app
from flower_medimg.core.settings import resolve_settings
from flower_medimg.lifecycle import ModelRegistry, load_exported, verify_audit_log
from flower_medimg.lifecycle.integrity import VerifyKey, key_path
from flower_medimg.lifecycle.outputs import load_global_model
from flower_medimg.lifecycle.registry import weights_sha256
from flower_medimg.server_app import make_server_app, run_experiment

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def _registry(folder):
    """Open a registry the ServerApp wrote, with the session's server key."""
    return ModelRegistry(folder, VerifyKey.load(key_path()), read_only=True)


def _simulate(server_app, config, mods=None, num_supernodes=3):
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(mods=mods, **config),
        num_supernodes=num_supernodes,
        backend_config=BACKEND,
    )


def site_1_declines_statistics(msg: Message, context: Context, call_next):
    """A ClientApp mod: site 1's node_config says it does not share statistics."""
    if int(context.node_config["partition-id"]) == 1:
        context.node_config["share-statistics"] = "false"
    return call_next(msg, context)


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory):
    """One run: statistics (site 1 declines), a reachable target, registry, audit."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    config = {
        **TINY,
        "num-server-rounds": 3,
        "output-dir": str(tmp / "out"),
        "registry.path": str(tmp / "registry"),
        "registry.keep": "all",
        "stop.metric": "central/dice",
        "stop.target": 0.01,  # any trained model reaches it: stops after round 1
        "strategy.name": "fedavg",
        "strategy.min-available-nodes": 3,  # statistics and round 1 wait for all
    }
    _simulate(make_server_app(**config), config, mods=[site_1_declines_statistics])
    (run_dir,) = (tmp / "out").iterdir()
    return config, run_dir, tmp


@pytest.mark.slow
def test_statistics_flags_shifted_sites_and_logs_the_refusal(lifecycle_run):
    _, run_dir, _ = lifecycle_run
    stats = json.loads((run_dir / "statistics.json").read_text())
    assert len(stats["declined"]) == 1
    (reason,) = stats["declined"].values()
    assert "declines to share" in reason
    sites = stats["sites"]
    assert sorted(s["partition-id"] for s in sites) == [0, 2]
    # scanner-shift 1: the two sites' histograms differ strongly and are flagged
    assert all(s["flagged"] and s["js-distance"] > 0.3 for s in sites)
    first, second = (s["histogram"] for s in sites)
    assert first != second
    # only summaries came back: a few dozen numbers, no pixel array
    for site in sites:
        assert len(site["histogram"]) == 32
        assert site["count"] == site["num-images"] * 32 * 32
    assert (run_dir / "statistics.png").stat().st_size > 0
    assert "declined" in (run_dir / "statistics.md").read_text()


@pytest.mark.slow
def test_target_stops_early_and_the_registry_records_why(lifecycle_run):
    config, run_dir, tmp = lifecycle_run
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1]
    registry = _registry(tmp / "registry")
    (run,) = registry.runs()
    assert run["status"] == "finished" and run["stop_reason"] == "target"
    assert "central/dice" in run["stop_message"] and "round 1" in run["stop_message"]
    (version,) = registry.versions(run["id"])
    assert run["best_version"] == version["id"]
    assert version["round"] == 1
    assert len(version["contributors"]) == 3
    assert [r["accepted"] for r in version["replies"]] == [True] * 3
    assert all(r["update_norm"] > 0 for r in version["replies"])
    assert sum(r["weight"] for r in version["replies"]) == pytest.approx(1.0)
    assert version["metrics"]["central/dice"] >= 0.01
    assert version["epsilon"] is None
    assert run["versions"]["monai"] and run["versions"]["torch"]
    assert run["config"]["stop.target"] == 0.01

    # the exported model is the run's global model: same SHA-256, same outputs
    out = registry.export(version["id"], tmp / "export")
    exported, in_memory = load_exported(out), load_global_model(run_dir)
    state = torch.load(run_dir / "global_model.pt", weights_only=True)
    assert weights_sha256(state) == version["sha256"]
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    exported.eval()
    in_memory.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), in_memory(x), rtol=0, atol=0)


@pytest.mark.slow
def test_audit_log_and_cross_site_matrix(lifecycle_run):
    _, run_dir, _ = lifecycle_run
    check = verify_audit_log(run_dir / "audit.jsonl", VerifyKey.load(key_path()))
    assert check.ok, check.message
    lines = (run_dir / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events[0] == "run-start" and events[-1] == "run-end"
    assert events.count("reply") == 3
    for needed in ("statistics", "round-sampled", "model-stored", "stop", "cross-site"):
        assert needed in events
    rows = (run_dir / "cross_site.csv").read_text().splitlines()
    assert rows[0] == "site,model,metric,value"
    dice_rows = [r for r in rows if ",dice," in r]
    assert len(dice_rows) == 3  # three sites x one model (the final is the best)
    assert "final (round 1)" in (run_dir / "cross_site.md").read_text()


class CrashingGrid:
    """Pass everything to the real grid, but fail while round ``crash_round`` trains."""

    def __init__(self, grid, crash_round):
        self.grid = grid
        self.crash_round = crash_round
        self.train_calls = 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_calls += 1
            if self.train_calls == self.crash_round:
                raise RuntimeError("simulated ServerApp crash")
        return self.grid.push_messages(messages)


def _crashing_server_app(config, crash_round):
    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_experiment(
            CrashingGrid(grid, crash_round), context, resolve_settings(overrides=config)
        )

    return app


@pytest.mark.slow
def test_resume_after_crash_matches_uninterrupted_fedadam(tmp_path):
    base = {
        **TINY,
        "num-server-rounds": 4,
        "strategy.name": "fedadam",
        "strategy.eta": 0.01,
        "central-eval": False,
        "stats.enabled": False,
        "cross-site.enabled": False,
        "registry.keep": "all",
    }
    straight = {
        **base,
        "output-dir": str(tmp_path / "a"),
        "registry.path": str(tmp_path / "ra"),
    }
    _simulate(make_server_app(**straight), straight, num_supernodes=2)
    (straight_dir,) = (tmp_path / "a").iterdir()

    resumed = {
        **base,
        "output-dir": str(tmp_path / "b"),
        "registry.path": str(tmp_path / "rb"),
    }
    with pytest.raises(Exception):  # noqa: B017 - the ServerApp's crash surfaces
        _simulate(
            _crashing_server_app(resumed, crash_round=3), resumed, num_supernodes=2
        )
    registry = _registry(tmp_path / "rb")
    (crashed,) = registry.runs()
    assert crashed["status"] == "running"
    assert registry.versions(crashed["id"])[-1]["round"] == 2
    registry.close()

    _simulate(make_server_app(**resumed), resumed, num_supernodes=2)  # the restart
    registry = _registry(tmp_path / "rb")
    first, second = registry.runs()
    assert first["status"] == "resumed"
    assert second["resumed_from"] == first["id"] and second["status"] == "finished"
    assert [v["round"] for v in registry.versions(second["id"])] == [3, 4]
    resumed_dir = Path(second["run_dir"])
    summary = json.loads((resumed_dir / "metrics.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]

    expected = torch.load(straight_dir / "global_model.pt", weights_only=True)
    got = torch.load(resumed_dir / "global_model.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
