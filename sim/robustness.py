"""Robust aggregation under attack, in Flower's Ray simulation, in one run.

8 synthetic sites (2D segmentation). Part 1: 2 of them send a scaled sign-flipped
update (``-3x``); final central Dice of FedAvg, FedMedian, Krum and
DistanceOutlierSuppression next to FedAvg without attackers, and FedAvg and DOS with
the quality gate's update-norm bound (2x the round's median). Part 2: 1 site sends
NaN; Flower's FedAvg behind our quality gate vs plain Flower FedAvg.

Usage::

    python sim/robustness.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import warnings
from pathlib import Path

import torch
from flwr.simulation import run_simulation

from flower_medimg.client_apps import make_client_app
from flower_medimg.server_app import make_server_app

warnings.filterwarnings("ignore")

SITES = 8


def simulate(overrides: dict) -> tuple[dict, dict]:
    """Run one federation; return its metrics summary and final global state."""
    config = {"data.num-sites": SITES, **overrides}
    with tempfile.TemporaryDirectory() as out:
        run_simulation(
            server_app=make_server_app(
                **{**config, "output-dir": out, "registry.path": f"{out}/registry"}
            ),
            client_app=make_client_app(**config),
            num_supernodes=SITES,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        (run_dir,) = Path(out).glob("run-*")
        summary = json.loads((run_dir / "metrics.json").read_text())
        state = torch.load(run_dir / "global_model.pt")
    return summary, state


def final_dice(summary: dict) -> float:
    return summary["rounds"][-1]["central"].get("dice", math.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples-per-site", type=int, default=24)
    args = parser.parse_args()
    base = {
        "num-server-rounds": args.rounds,
        "data.samples-per-site": args.samples_per_site,
        "strategy.min-train-nodes": SITES,
        "strategy.min-available-nodes": SITES,
    }
    attack = {"attack.kind": "sign-flip", "attack.sites": "0,1"}

    print(f"== {SITES} sites, 2 attackers (sign-flip x-3), {args.rounds} rounds ==")
    clean, _ = simulate({**base, "strategy.name": "fedavg"})
    reference = final_dice(clean)
    print(f"{'FedAvg, no attackers':40s} Dice {reference:.4f}  (reference)")
    cases = [
        ("FedAvg", {"strategy.name": "fedavg"}),
        ("FedMedian (Flower)", {"strategy.name": "fedmedian"}),
        (
            "Krum (Flower, f=2)",
            {"strategy.name": "krum", "strategy.num-malicious-nodes": 2},
        ),
        ("DistanceOutlierSuppression", {"strategy.name": "dos"}),
        (
            "FedAvg + gate (update norm <= 2x median)",
            {"strategy.name": "fedavg", "gate.update-norm-factor": 2.0},
        ),
        (
            "DOS + gate (update norm <= 2x median)",
            {"strategy.name": "dos", "gate.update-norm-factor": 2.0},
        ),
    ]
    for name, overrides in cases:
        summary, _ = simulate({**base, **attack, **overrides})
        dice = final_dice(summary)
        print(f"{name:40s} Dice {dice:.4f}  ({dice / reference:.1%} of clean FedAvg)")

    print(f"\n== {SITES} sites, 1 site sends NaN, {args.rounds} rounds ==")
    nan_attack = {"attack.kind": "nan", "attack.sites": "3", "strategy.name": "fedavg"}
    for name, gate in (("QualityGate(FedAvg)", True), ("plain Flower FedAvg", False)):
        summary, state = simulate({**base, **nan_attack, "gate.enabled": gate})
        finite = all(torch.isfinite(v.float()).all() for v in state.values())
        print(
            f"{name:40s} finished; global model finite: {finite}; "
            f"final Dice {final_dice(summary):.4f}"
        )


if __name__ == "__main__":
    main()
