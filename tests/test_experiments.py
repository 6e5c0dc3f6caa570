"""The experiment runner (sim/experiments.py) on a tiny grid in Flower's simulation."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "experiments", ROOT / "sim" / "experiments.py"
)
experiments = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiments)

TINY = [
    "--set=model.channels='4,8,16'",
    "--set=data.image-size=32",
    "--set=data.samples-per-site=12",
    "--set=data.num-sites=2",
    "--set=train.batch-size=4",
]


def test_scenarios_load_and_bad_names_are_listed():
    names = experiments.available_scenarios()
    for expected in (
        "iid",
        "quantity-skew",
        "label-skew",
        "scanner-shift-2d",
        "scanner-shift-3d",
        "attackers",
        "dropouts",
        "mix",
    ):
        assert expected in names
        experiments.load_scenario(expected)  # every key is a run-config key
    assert experiments.load_scenario("label-skew")["task"] == "classification"
    with pytest.raises(ValueError, match="Unknown scenario 'iid2'.*attackers"):
        experiments.load_scenario("iid2")
    with pytest.raises(ValueError, match="Unknown method 'fedbm'.*fedbn"):
        experiments.method_overrides("fedbm")
    composed = experiments.method_overrides("fedprox+harmofl+class-weights+flop+fedbn")
    assert composed["method.names"] == "harmofl,class-weights"
    assert composed["private-params"] == "head+norm"
    assert composed["strategy.proximal-mu"] == 0.01
    with pytest.raises(ValueError, match="strategy.name"):
        experiments.method_overrides("krum+fedmedian")


@pytest.mark.slow
def test_tiny_grid_runs_writes_tables_and_plots_then_resumes(tmp_path, monkeypatch):
    argv = [
        "--scenarios=iid",
        "--methods=fedprox+harmofl,local",
        "--seeds=0",
        "--rounds=2",
        f"--out={tmp_path}",
        "--cpus-per-client=1",
        *TINY,
    ]
    assert experiments.main(argv) == {"ran": 2, "skipped": 0}

    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert [c.name for c in cells] == [
        "iid__fedprox+harmofl__seed-0.json",
        "iid__local__seed-0.json",
    ]
    federated = json.loads(cells[0].read_text())
    assert len(federated["rounds"]) == 2
    assert federated["train-replies"] == [2, 2]
    assert set(federated["sites"]) == {"0", "1"}
    assert all(0.0 <= v <= 1.0 for v in federated["sites"].values())
    local = json.loads(cells[1].read_text())
    assert len(local["cross-site"]) == 2  # each local model on every site's split

    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["fedprox+harmofl", "local"]
    for row in rows:
        sites = [float(row["site-0"]), float(row["site-1"])]
        assert float(row["worst"]) == pytest.approx(min(sites))
        assert float(row["mean"]) == pytest.approx(sum(sites) / 2)
    table = (tmp_path / "summary.md").read_text()
    assert "| fedprox+harmofl |" in table and "| local |" in table
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 2 * 2
    for name in ("iid-rounds.png", "iid-sites.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    # a second invocation finds both cells finished and runs nothing
    mtimes = [c.stat().st_mtime_ns for c in cells]

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(experiments, "run_simulation", forbidden)
    monkeypatch.setattr(experiments, "run_baseline", forbidden)
    assert experiments.main(argv) == {"ran": 0, "skipped": 2}
    assert [c.stat().st_mtime_ns for c in cells] == mtimes
