"""Robust aggregation under attack, in Flower's Ray simulation, in one run.

Synthetic sites (2D segmentation), final central Dice (held-out patients).

``--part default`` (the trust evidence): the **default** run config with 3 and with
8 sites, one hostile site each time: a sign-flipped update (-3x), Gaussian weights,
values of 1e15, ``num-examples = 1e9``, a loss lie (FedCostWAvg), a ``nova-a`` lie
(FedNova); each as a share of the same strategy's clean default run, and the clean
default run next to the gate switched off.

``--part strategies``: 8 sites, 2 of them send a sign-flipped update; FedAvg,
FedMedian, Krum and DistanceOutlierSuppression next to FedAvg without attackers, and
FedAvg and DOS with the update-norm bound; then 1 site sends NaN, Flower's FedAvg
behind the gate vs plain Flower FedAvg.

Usage::

    python sim/robustness.py --part default --rounds 5 --sites 3,8
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
from flower_medimg.simulation import backend_config

warnings.filterwarnings("ignore")

SITES = 8


def simulate(overrides: dict, sites: int = SITES) -> tuple[dict, dict]:
    """Run one federation; return its metrics summary and final global state."""
    config = {"data.num-sites": sites, **overrides}
    with tempfile.TemporaryDirectory() as out:
        run_simulation(
            server_app=make_server_app(
                **{**config, "output-dir": out, "registry.path": f"{out}/registry"}
            ),
            client_app=make_client_app(**config),
            num_supernodes=sites,
            backend_config=backend_config(),
        )
        (run_dir,) = Path(out).glob("run-*")
        summary = json.loads((run_dir / "metrics.json").read_text())
        state = torch.load(run_dir / "global_model.pt")
    return summary, state


def final_dice(summary: dict) -> float:
    return summary["rounds"][-1]["central"].get("dice", math.nan)


def rejections(summary: dict) -> str:
    """Replies the gate rejected, per round (e.g. ``1,1,0,1,1``)."""
    return ",".join(
        str(int(r["train"].get("gate-rejected", 0))) for r in summary["rounds"]
    )


#: One hostile site under the default run config: (row, strategy, attack).
DEFAULT_PROBES = (
    ("sign-flip (-3x)", "fedavg", "sign-flip"),
    ("Gaussian weights", "fedavg", "gaussian"),
    ("values of 1e15", "fedavg", "huge"),
    ("num-examples = 1e9", "fedavg", "num-examples-lie"),
    ("loss lie (FedCostWAvg)", "fedcostwavg", "loss-lie"),
    ("nova-a lie (FedNova)", "fednova", "nova-a-lie"),
)


def default_part(rounds: int, samples_per_site: int, federations: list[int]) -> None:
    """The default run config against one hostile site of each federation size."""
    for sites in federations:
        base = {
            "num-server-rounds": rounds,
            "data.samples-per-site": samples_per_site,
            "strategy.min-available-nodes": sites,
            "strategy.min-train-nodes": sites,
        }
        print(f"\n== default run config, {sites} sites, {rounds} rounds ==")
        clean = {}
        for name in sorted({strategy for _, strategy, _ in DEFAULT_PROBES}):
            summary, _ = simulate({**base, "strategy.name": name}, sites)
            clean[name] = final_dice(summary)
            print(
                f"{'clean, default (' + name + ')':34s} Dice {clean[name]:.4f}  "
                f"rejected per round {rejections(summary)}"
            )
        gate_off = final_dice(simulate({**base, "gate.enabled": False}, sites)[0])
        print(
            f"{'clean, gate off':34s} Dice {gate_off:.4f}  (default = "
            f"{clean['fedavg'] / gate_off:.1%} of gate off)"
        )
        for row, strategy, attack in DEFAULT_PROBES:
            summary, _ = simulate(
                {
                    **base,
                    "strategy.name": strategy,
                    "attack.kind": attack,
                    "attack.sites": "0",
                },
                sites,
            )
            dice = final_dice(summary)
            print(
                f"{row:34s} Dice {dice:.4f}  ({dice / clean[strategy]:.1%} of clean "
                f"{strategy})  rejected per round {rejections(summary)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("default", "strategies"), default="default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples-per-site", type=int, default=24)
    parser.add_argument(
        "--sites", default="3,8", help="federation sizes of --part default, e.g. 3,8"
    )
    args = parser.parse_args()
    if args.part == "default":
        sizes = [int(size) for size in args.sites.split(",")]
        default_part(args.rounds, args.samples_per_site, sizes)
        return
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
