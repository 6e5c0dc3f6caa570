"""Final Dice and round time: plain FedAvg vs SecAgg+, CKKS and each codec.

The default scenario (synthetic sites, 64x64, the default 2D UNet) is trained in
Flower's Ray simulation runtime once per variant, with the same seeds. Printed per
variant: the central Dice of the final global model and the sites' weighted mean
Dice of it (CKKS keeps the global model encrypted at the server, so it has only
the latter), each with its ratio to plain FedAvg, and the median round time (the
recorder's wall time of each round: SecAgg+'s extra exchanges included) with its
ratio to plain FedAvg's.

With ``--seeds 0,1,2`` every variant runs once per seed (round-robin over the
variants) and the figures are means over the seeds: one seed's Dice differs from
another's by more than the codecs' error.

Usage: python sim/what_leaves_dice.py [--rounds 10] [--sites 4] [--seeds 0]
       [--variants plain,fp16,int8,topk-10%,secagg,secagg+int8,ckks]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from flwr.simulation import run_simulation

from flower_medimg.client_apps import make_client_app
from flower_medimg.core.homomorphic import provision_contexts
from flower_medimg.server_app import make_server_app

NO_UPDATE_CHECKS = {
    "gate.update-norm-factor": 0.0,
    "gate.min-cosine": -1.0,
    "gate.max-update-norm": 0.0,
}
#: Every variant runs with the same reply gate: the per-update checks that secure
#: aggregation and encryption cannot run are off for all, so that the modes, not
#: the screening, make the difference.
VARIANTS = {
    "plain": {},
    "fp16": {"compression.codec": "fp16"},
    "int8": {"compression.codec": "int8"},
    "topk-10%": {"compression.codec": "topk", "compression.fraction": 0.1},
    "secagg": {"secagg.enabled": True},
    "secagg+int8": {"secagg.enabled": True, "compression.codec": "int8"},
    "ckks": {"he.enabled": True, "central-eval": False},
}


def run_variant(name: str, rounds: int, sites: int, seed: int, folder: Path) -> dict:
    config = {
        "seed": seed,
        "data.num-sites": sites,
        "num-server-rounds": rounds,
        "output-dir": str(folder / f"{name}-{seed}"),
        "registry.path": "",
        "cross-site.enabled": False,
        "stats.enabled": False,
        **NO_UPDATE_CHECKS,
        **VARIANTS[name],
    }
    if name == "ckks":
        config["he.context-dir"] = str(folder / "he")
    started = time.perf_counter()
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_client_app(**config),
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - started
    (run_dir,) = (folder / f"{name}-{seed}").iterdir()
    rounds_done = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    last = rounds_done[-1]
    sites = last["clients-evaluate"]
    site_dice = sum(s["dice"] * s["num-examples"] for s in sites) / sum(
        s["num-examples"] for s in sites
    )
    return {
        "central": (last.get("central") or {}).get("dice"),
        "sites": site_dice,
        "wall": wall,
        "round": statistics.median(r["wall-time-s"] for r in rounds_done),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(
        "load before:",
        subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        provision_contexts(folder / "he")
        seeds = [int(seed) for seed in args.seeds.split(",")]
        names = args.variants.split(",")
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for seed in seeds:  # round-robin over the variants
            for name in names:
                runs[name].append(
                    run_variant(name, args.rounds, args.sites, seed, folder)
                )
        for name, done in runs.items():
            results[name] = {
                key: None
                if done[0][key] is None
                else statistics.mean(r[key] for r in done)
                for key in done[0]
            }
    print(
        "load after:",
        subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    )
    plain = results.get("plain")
    print(
        f"\n{args.rounds} rounds, {args.sites} sites, default scenario, "
        f"seeds {args.seeds} (means)"
    )
    header = (
        "variant",
        "central Dice",
        "/ plain",
        "site Dice",
        "/ plain",
        "round s",
        "/ plain",
        "wall s",
    )
    widths = (-14, 13, 9, 11, 9, 9, 9, 8)
    print(
        "".join(
            f"{h:{'<' if w < 0 else '>'}{abs(w)}}"
            for h, w in zip(header, widths, strict=True)
        )
    )
    for name, r in results.items():
        central = "-" if r["central"] is None else f"{r['central']:.4f}"
        c_ratio = (
            f"{r['central'] / plain['central']:.3f}"
            if plain and r["central"] is not None and plain["central"]
            else "-"
        )
        s_ratio = f"{r['sites'] / plain['sites']:.3f}" if plain else "-"
        t_ratio = f"{r['round'] / plain['round']:.2f}" if plain else "-"
        print(
            f"{name:<14}{central:>13}{c_ratio:>9}{r['sites']:>11.4f}{s_ratio:>9}"
            f"{r['round']:>9.2f}{t_ratio:>9}{r['wall']:>8.1f}"
        )


if __name__ == "__main__":
    main()
