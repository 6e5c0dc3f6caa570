"""Experiment runner: strategies x client methods x scenarios x seeds, side by side.

Every federated cell runs in Flower's simulation runtime (``run_simulation`` with
``make_server_app`` / ``make_client_app``). The FLamby protocol (du Terrail et al.,
NeurIPS 2022 Datasets and Benchmarks, https://arxiv.org/abs/2210.04620) fixes the
budget: pooled (centralised) training takes as many optimizer steps as all sites
take together in the federation, local-only training gives each site the steps it
takes in the federation, and every model is scored on every site's test split (the
synthetic sites' validation split). A site is scored with the model it would
deploy: the global model, its personalised model (FLOP/FedBN) or its local model.

Methods (``--methods``, comma-separated; ``a+b`` composes them):

- a strategy name of :data:`flower_medimg.strategies.registry.STRATEGIES`
  (``fedavg``, ``fedmedian``, ``krum``, ``dos``, ...);
- ``fedprox`` (Flower's FedProx, mu = 0.01), ``fedbn`` (private norm layers, a
  BatchNorm network), ``flop`` (private head), ``harmofl``, ``class-weights``,
  ``fedmax``;
- ``pooled`` and ``local``: the centralised and the local-only baselines.

Scenarios (``--scenarios``) are the TOML presets in ``sim/scenarios/``.

Writes to ``--out``: ``cells/*.json`` (one per finished cell; a rerun skips them),
``results.csv`` (every site's final metric per cell), ``summary.csv`` and
``summary.md`` (mean +- std over seeds of the sites' mean, of the worst site and of
each site), ``plots/<scenario>-rounds.png`` (metric vs round per method) and
``plots/<scenario>-sites.png`` (per-site bars).

Usage::

    python sim/experiments.py --scenarios iid,scanner-shift-2d \\
        --methods fedavg,fedbn,harmofl,fedprox,pooled,local --seeds 0,1,2 \\
        --rounds 5 --out results/heterogeneity
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.common.config import flatten_dict
from flwr.simulation import run_simulation
from monai.data import DataLoader
from rich.progress import Progress
from torch.utils.data import ConcatDataset

from flower_medimg.client_apps import make_client_app
from flower_medimg.client_apps.training import make_optimizer, train_local
from flower_medimg.core.device import device
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import DEFAULTS, resolve_settings
from flower_medimg.core.tasks import get_task
from flower_medimg.data import site_datasets
from flower_medimg.server_app import make_server_app
from flower_medimg.strategies.registry import STRATEGIES

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
BASELINES = ("pooled", "local")
#: Methods that are not just a strategy name: their run-config overrides.
ARMS: dict[str, dict[str, Any]] = {
    "fedprox": {"strategy.name": "fedprox", "strategy.proximal-mu": 0.01},
    "fedbn": {"private-params": "norm", "model.norm": "batch"},
    "flop": {"private-params": "head"},
    "harmofl": {"method.names": "harmofl"},
    "class-weights": {"method.names": "class-weights"},
    "fedmax": {"method.names": "fedmax"},
    "krum": {"strategy.name": "krum", "strategy.num-malicious-nodes": 1},
}
#: The metric a task's table reports (higher is better).
METRICS = {"segmentation": "dice", "classification": "accuracy"}


# --- scenarios and methods ------------------------------------------------------------


def available_scenarios() -> list[str]:
    """Names of the scenario presets in ``sim/scenarios/``."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name: str) -> dict[str, Any]:
    """Return a scenario preset's run-config overrides (dotted keys).

    Raises
    ------
    ValueError
        For an unknown name (the available presets are listed) or a key that is not
        a run-config key.
    """
    path = SCENARIO_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(
            f"Unknown scenario {name!r}; available scenarios: "
            f"{', '.join(available_scenarios())}"
        )
    overrides = flatten_dict(tomllib.loads(path.read_text()).get("config", {}))
    try:
        resolve_settings(overrides=overrides)
    except KeyError as error:
        raise ValueError(f"Scenario {path}: {error.args[0]}") from None
    return overrides


def scenario_description(name: str) -> str:
    """The one-line description of a scenario preset."""
    path = SCENARIO_DIR / f"{name}.toml"
    return str(tomllib.loads(path.read_text()).get("description", name))


def method_overrides(method: str) -> dict[str, Any]:
    """Return the run-config overrides of a (possibly composed, ``a+b``) method.

    Raises
    ------
    ValueError
        For an unknown method (the valid ones are listed), a baseline composed with
        something else, or two parts that set the same key differently.
    """
    parts = [p.strip().lower() for p in method.split("+") if p.strip()]
    merged: dict[str, Any] = {}
    for part in parts:
        if part in BASELINES:
            if len(parts) > 1:
                raise ValueError(f"Baseline {part!r} cannot be composed ({method!r})")
            return {}
        if part in ARMS:
            overrides = ARMS[part]
        elif part in STRATEGIES:
            overrides = {"strategy.name": part}
        else:
            valid = sorted({*ARMS, *STRATEGIES, *BASELINES})
            raise ValueError(
                f"Unknown method {part!r} in {method!r}; valid methods: "
                f"{', '.join(valid)} (compose with '+', e.g. 'fedprox+harmofl')"
            )
        for key, value in overrides.items():
            if key == "method.names" and key in merged:
                value = f"{merged[key]},{value}"
            elif key == "private-params" and key in merged:
                value = "+".join(sorted({merged[key], value}))
            elif key in merged and merged[key] != value:
                raise ValueError(
                    f"Method {method!r}: its parts set {key} to {merged[key]!r} "
                    f"and {value!r}"
                )
            merged[key] = value
    return merged


# --- one cell -----------------------------------------------------------------------


def client_resources(num_sites: int, cpus_per_client: int) -> dict[str, float]:
    """Flower's per-client resources: on GPUs, the sites share them evenly."""
    gpus = torch.cuda.device_count()
    return {
        "num_cpus": cpus_per_client,
        "num_gpus": min(1.0, gpus / num_sites) if gpus else 0.0,
    }


def _site_score(model: torch.nn.Module, dataset, config: dict[str, Any]) -> float:
    task = get_task(config["task"])
    loader = DataLoader(dataset, batch_size=int(config["train.batch-size"]))
    dev = device()
    return float(task.evaluate(model.to(dev), loader, dev)[METRICS[config["task"]]])


def _train_loader(dataset, config: dict[str, Any], seed: int) -> DataLoader:
    """A shuffled loader as the ClientApp builds it (same steps per epoch)."""
    batch_size = int(config["train.batch-size"])
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(dataset) % batch_size == 1,
    )


def _sites(config: dict[str, Any]) -> list[tuple[Any, Any]]:
    num_sites = int(config["data.num-sites"])
    return [
        site_datasets(config, {"partition-id": k, "num-partitions": num_sites})
        for k in range(num_sites)
    ]


def run_baseline(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """Pooled or local-only training with the federation's budget of steps.

    One "round" of a baseline is the steps the federation takes in one round
    (pooled: all sites' steps; local: the site's own), so the curves line up.
    """
    rounds = int(config["num-server-rounds"])
    epochs = int(config["train.local-epochs"])
    task = get_task(config["task"])
    sites = _sites(config)
    seed = int(config["seed"])
    dev = device()
    if kind == "pooled":
        loaders = [_train_loader(train, config, seed) for train, _ in sites]
        budget = sum(len(loader) for loader in loaders)  # all sites' steps per epoch
        pooled = _train_loader(ConcatDataset([t for t, _ in sites]), config, seed)
        trainees = [(model_from_settings(config), pooled, budget)]
    else:
        trainees = [
            (
                model_from_settings(config),
                _train_loader(train, config, seed + k),
                None,
            )
            for k, (train, _) in enumerate(sites)
        ]
    history = []
    for model, loader, budget in trainees:
        model.to(dev)
        optimizer = make_optimizer(
            model,
            config["train.optimizer"],
            lr=float(config["train.lr"]),
            momentum=float(config["train.momentum"]),
        )
        batches = _Budgeted(loader, budget) if budget else loader
        curve = []
        for _ in range(rounds):
            train_local(model, batches, task.loss_fn(), optimizer, epochs, dev)
            curve.append([_site_score(model, val, config) for _, val in sites])
        history.append(curve)
    if kind == "pooled":
        per_round = [dict(enumerate(scores)) for scores in history[0]]
        cross_site = [history[0][-1]]
    else:  # site k deploys its own model
        per_round = [
            {k: history[k][r][k] for k in range(len(sites))} for r in range(rounds)
        ]
        cross_site = [curve[-1] for curve in history]
    return {"rounds": per_round, "cross-site": cross_site}


class _Budgeted:
    """Exactly ``steps`` batches per pass, cycling through ``loader`` (pooled)."""

    def __init__(self, loader: DataLoader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __iter__(self):
        taken = 0
        while taken < self.steps:
            for batch in self.loader:
                if taken == self.steps:
                    return
                taken += 1
                yield batch


def run_federated(
    config: dict[str, Any], cpus_per_client: int, workdir: Path
) -> dict[str, Any]:
    """One federation in Flower's simulation runtime; every site's score per round."""
    num_sites = int(config["data.num-sites"])
    run_simulation(
        server_app=make_server_app(**{**config, "output-dir": str(workdir)}),
        client_app=make_client_app(**config),
        num_supernodes=num_sites,
        backend_config={
            "client_resources": client_resources(num_sites, cpus_per_client)
        },
    )
    run_dirs = [p for p in workdir.iterdir() if (p / "metrics.json").exists()]
    if len(run_dirs) != 1:
        raise RuntimeError(
            f"The simulation left no metrics.json in {workdir}; see its log above"
        )
    summary = json.loads((run_dirs[0] / "metrics.json").read_text())
    metric = METRICS[config["task"]]
    per_round = [
        {int(c["partition-id"]): c[metric] for c in entry["clients-evaluate"]}
        for entry in summary["rounds"]
    ]
    # replies whose metrics the strategy aggregated: dropouts lower it, Krum keeps 1
    aggregated = [len(entry["clients-train"]) for entry in summary["rounds"]]
    return {"rounds": per_round, "train-replies": aggregated}


def cell_config(
    scenario: str, method: str, seed: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """The run config of one cell: scenario < ``--set`` settings < method."""
    overrides = {
        **load_scenario(scenario),
        **settings,
        **method_overrides(method),
        "seed": seed,
        "central-eval": False,  # every site scores the model on its own split
    }
    if "registry.path" in DEFAULTS:  # no model registry for throw-away cells
        overrides["registry.path"] = ""
    return resolve_settings(overrides=overrides)


def run_cell(
    scenario: str,
    method: str,
    seed: int,
    settings: dict[str, Any],
    cpus_per_client: int,
) -> dict[str, Any]:
    """Run one cell and return its record (what ``cells/*.json`` holds)."""
    config = cell_config(scenario, method, seed, settings)
    started = time.perf_counter()
    if method in BASELINES:
        result = run_baseline(method, config)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_federated(config, cpus_per_client, Path(tmp))
    final = result["rounds"][-1]
    num_sites = int(config["data.num-sites"])
    if sorted(final) != list(range(num_sites)):
        raise RuntimeError(
            f"Cell {scenario}/{method}/seed {seed}: scores for sites {sorted(final)}, "
            f"expected 0..{num_sites - 1}"
        )
    return {
        "scenario": scenario,
        "method": method,
        "seed": seed,
        "metric": METRICS[config["task"]],
        "rounds": [{str(k): v for k, v in r.items()} for r in result["rounds"]],
        "sites": {str(k): final[k] for k in range(num_sites)},
        **{k: v for k, v in result.items() if k != "rounds"},
        "seconds": time.perf_counter() - started,
    }


# --- the grid -----------------------------------------------------------------------


def cell_path(out: Path, scenario: str, method: str, seed: int) -> Path:
    """Where a finished cell's record lives."""
    return out / "cells" / f"{scenario}__{method}__seed-{seed}.json"


def run_grid(
    scenarios: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    settings: dict[str, Any] | None = None,
    cpus_per_client: int = 1,
) -> dict[str, int]:
    """Run every unfinished cell, then write the tables and plots.

    Returns
    -------
    dict
        ``{"ran": n, "skipped": m}``.
    """
    settings = dict(settings or {})
    for scenario in scenarios:  # fail on a bad name before any cell runs
        load_scenario(scenario)
    for method in methods:
        method_overrides(method)
    resolve_settings(overrides=settings)
    cells = [(s, m, seed) for s in scenarios for m in methods for seed in seeds]
    counts = {"ran": 0, "skipped": 0}
    with Progress() as progress:
        bar = progress.add_task("cells", total=len(cells))
        for scenario, method, seed in cells:
            path = cell_path(out, scenario, method, seed)
            progress.update(bar, description=f"{scenario} / {method} / seed {seed}")
            if path.exists():
                counts["skipped"] += 1
            else:
                record = run_cell(scenario, method, seed, settings, cpus_per_client)
                record["settings"] = settings
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record, indent=1))
                tmp.replace(path)  # a cell counts as finished only when complete
                counts["ran"] += 1
            progress.advance(bar)
    records = [
        json.loads(cell_path(out, s, m, seed).read_text()) for s, m, seed in cells
    ]
    write_tables(records, out)
    write_plots(records, out)
    return counts


# --- tables and plots ---------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, method): mean +- std over seeds.

    ``mean`` is the sites' mean metric, ``worst`` the worst site's; ``site-k`` is
    site k's metric.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["scenario"], record["method"]), []).append(record)
    rows = []
    for (scenario, method), group in groups.items():
        sites = sorted(group[0]["sites"], key=int)
        means = [statistics.fmean(r["sites"].values()) for r in group]
        worsts = [min(r["sites"].values()) for r in group]
        row: dict[str, Any] = {
            "scenario": scenario,
            "method": method,
            "metric": group[0]["metric"],
            "seeds": len(group),
        }
        row["mean"], row["mean-std"] = _mean_std(means)
        row["worst"], row["worst-std"] = _mean_std(worsts)
        for site in sites:
            row[f"site-{site}"], row[f"site-{site}-std"] = _mean_std(
                [r["sites"][site] for r in group]
            )
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as one Markdown table per scenario (with the change vs FedAvg)."""
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        group = [r for r in rows if r["scenario"] == scenario]
        sites = [k[5:] for k in group[0] if k.startswith("site-") and "std" not in k]
        reference = next((r for r in group if r["method"] == "fedavg"), None)
        metric = group[0]["metric"]
        lines += [
            f"### {scenario} ({metric}, {group[0]['seeds']} seeds)",
            "",
            scenario_description(scenario),
            "",
            "| method | mean over sites | worst site | vs FedAvg (mean / worst) | "
            + " | ".join(f"site {s}" for s in sites)
            + " |",
            "|---" * (4 + len(sites)) + "|",
        ]
        for row in group:
            delta = "-"
            if reference is not None and row is not reference:
                delta = (
                    f"{row['mean'] - reference['mean']:+.3f} / "
                    f"{row['worst'] - reference['worst']:+.3f}"
                )
            cells = [
                row["method"],
                f"{row['mean']:.3f} ± {row['mean-std']:.3f}",
                f"{row['worst']:.3f} ± {row['worst-std']:.3f}",
                delta,
                *(f"{row[f'site-{s}']:.3f}" for s in sites),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_tables(records: Sequence[dict[str, Any]], out: Path) -> None:
    """Write ``results.csv``, ``summary.csv`` and ``summary.md``."""
    out.mkdir(parents=True, exist_ok=True)
    long_rows = [
        {
            "scenario": r["scenario"],
            "method": r["method"],
            "seed": r["seed"],
            "site": int(site),
            "metric": r["metric"],
            "value": value,
        }
        for r in records
        for site, value in r["sites"].items()
    ]
    _write_csv(out / "results.csv", long_rows)
    rows = summarise(records)
    _write_csv(out / "summary.csv", rows)
    (out / "summary.md").write_text(markdown(rows))


def write_plots(records: Sequence[dict[str, Any]], out: Path) -> None:
    """Per scenario: metric vs round per method, and per-site bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = summarise(records)
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        group = [r for r in records if r["scenario"] == scenario]
        methods = list(dict.fromkeys(r["method"] for r in group))
        metric = group[0]["metric"]

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in methods:
            curves = [
                [statistics.fmean(rnd.values()) for rnd in r["rounds"]]
                for r in group
                if r["method"] == method
            ]
            mean = [statistics.fmean(v) for v in zip(*curves, strict=True)]
            ax.plot(range(1, len(mean) + 1), mean, marker="o", label=method)
        ax.set(xlabel="round", ylabel=f"{metric} (mean over sites)", title=scenario)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(plots / f"{scenario}-rounds.png", dpi=100)
        plt.close(fig)

        summary = [r for r in rows if r["scenario"] == scenario]
        sites = [k[5:] for k in summary[0] if k.startswith("site-") and "std" not in k]
        width = 0.8 / len(summary)
        fig, ax = plt.subplots(figsize=(max(6, 2 + 0.4 * len(sites) * len(summary)), 4))
        for i, row in enumerate(summary):
            ax.bar(
                [k + i * width for k in range(len(sites))],
                [row[f"site-{s}"] for s in sites],
                width,
                yerr=[row[f"site-{s}-std"] for s in sites],
                label=row["method"],
            )
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sites))])
        ax.set_xticklabels([f"site {s}" for s in sites])
        ax.set(ylabel=metric, title=f"{scenario}: final {metric} per site")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(plots / f"{scenario}-sites.png", dpi=100)
        plt.close(fig)


# --- command line -------------------------------------------------------------------


def _parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as TOML (numbers, booleans, strings)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            settings[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            settings[key.strip()] = text
    return settings


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="iid", help="comma-separated presets")
    parser.add_argument("--methods", default="fedavg,pooled,local")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="experiments")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config setting for every cell (e.g. data.image-size=32)",
    )
    parser.add_argument(
        "--cpus-per-client", type=int, default=max(1, (os.cpu_count() or 2) // 4)
    )
    args = parser.parse_args(argv)
    settings = {"num-server-rounds": args.rounds, **_parse_settings(args.set)}
    counts = run_grid(
        _split(args.scenarios),
        _split(args.methods),
        [int(s) for s in _split(args.seeds)],
        Path(args.out),
        settings,
        args.cpus_per_client,
    )
    print(
        f"{counts['ran']} cells run, {counts['skipped']} already finished; "
        f"results in {Path(args.out).resolve()}"
    )
    print((Path(args.out) / "summary.md").read_text())
    return counts


if __name__ == "__main__":
    main()
