"""Federated vs pooled training on the default synthetic federation, in one run.

Runs the default federation (4 sites, FedAvg) in Flower's Ray simulation runtime,
then trains the same network on the pooled training data of all sites with the same
total number of local updates (optimizer steps), and scores both on the same
server-held test set (the union of every site's validation split).

Prints: federated Dice, pooled Dice and their ratio; wall time per round; Flower's
overhead (round wall time divided by the sum of the sites' compute time, i.e. their
local training and evaluation time).

Usage::

    python sim/federated_vs_pooled.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.simulation import run_simulation
from monai.data import DataLoader
from torch.utils.data import ConcatDataset

from flower_medimg.client_apps import make_client_app
from flower_medimg.client_apps.training import make_optimizer, train_local
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.core.tasks import get_task
from flower_medimg.data import central_test_dataset, site_datasets
from flower_medimg.server_app import make_server_app


def federated(config: dict, num_sites: int, out: Path) -> dict:
    run_simulation(
        server_app=make_server_app(**{**config, "output-dir": str(out)}),
        client_app=make_client_app(**config),
        num_supernodes=num_sites,
        # 2 CPUs per client: sites train one after another, so the sum of their
        # compute times is comparable with the round's wall time.
        backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
    )
    (run_dir,) = out.iterdir()
    return json.loads((run_dir / "metrics.json").read_text())


def pooled(config: dict, num_sites: int, total_steps: int) -> dict:
    """Train on all sites' pooled training data for ``total_steps`` optimizer steps."""
    torch.manual_seed(int(config["seed"]))
    model = model_from_settings(config)
    task = get_task(config["task"])
    train_sets = [
        site_datasets(config, {"partition-id": k, "num-partitions": num_sites})[0]
        for k in range(num_sites)
    ]
    loader = DataLoader(
        ConcatDataset(train_sets),
        batch_size=int(config["train.batch-size"]),
        shuffle=True,
        generator=torch.Generator().manual_seed(int(config["seed"])),
    )
    optimizer = make_optimizer(
        model, config["train.optimizer"], float(config["train.lr"])
    )
    device = torch.device("cpu")
    steps_per_epoch = len(loader)
    epochs, remainder = divmod(total_steps, steps_per_epoch)
    started = time.perf_counter()
    train_local(model, loader, task.loss_fn(), optimizer, epochs, device)
    if remainder:
        first = [batch for _, batch in zip(range(remainder), loader, strict=False)]
        train_local(model, first, task.loss_fn(), optimizer, 1, device)
    seconds = time.perf_counter() - started
    test = DataLoader(
        central_test_dataset(config),
        batch_size=int(config["train.batch-size"]),
    )
    return {**task.evaluate(model, test, device), "train-time-s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sites", type=int, default=4)
    args = parser.parse_args()

    config = resolve_settings(
        overrides={"num-server-rounds": args.rounds, "data.num-sites": args.sites}
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = federated(config, args.sites, Path(tmp))
        federated_seconds = time.perf_counter() - started

    rounds = summary["rounds"]
    total_steps = sum(c["local-steps"] for r in rounds for c in r["clients-train"])
    pooled_metrics = pooled(config, args.sites, total_steps)

    fed_dice = rounds[-1]["central"]["dice"]
    wall = [r["wall-time-s"] for r in rounds]
    compute = [
        sum(c["train-time-s"] for c in r["clients-train"])
        + sum(c["eval-time-s"] for c in r["clients-evaluate"])
        for r in rounds
    ]
    overhead = [w / c for w, c in zip(wall, compute, strict=True)]

    print(f"sites={args.sites} rounds={args.rounds} strategy={config['strategy.name']}")
    print(f"local updates in total (federated = pooled): {total_steps}")
    print("central Dice per round:", [round(r["central"]["dice"], 4) for r in rounds])
    print(f"federated Dice        : {fed_dice:.4f}")
    print(f"pooled Dice           : {pooled_metrics['dice']:.4f}")
    print(f"federated / pooled    : {fed_dice / pooled_metrics['dice']:.4f}")
    print(
        f"federated HD95 / pooled HD95: {rounds[-1]['central']['hd95']:.2f} / "
        f"{pooled_metrics['hd95']:.2f}"
    )
    print(
        f"wall time per round   : median {statistics.median(wall):.2f} s "
        f"(first {wall[0]:.2f} s)"
    )
    print(
        f"Flower overhead (round wall / sum of site compute): median "
        f"{statistics.median(overhead):.2f}x (first round {overhead[0]:.2f}x)"
    )
    print(
        f"whole federated run incl. runtime start/stop: {federated_seconds:.1f} s; "
        f"pooled training: {pooled_metrics['train-time-s']:.1f} s"
    )


if __name__ == "__main__":
    main()
