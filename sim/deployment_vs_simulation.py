"""Deployment runtime vs simulation runtime, measured side by side in one run.

1. Wall time of the same 3-site, 3-round experiment (a small 2D UNet on synthetic
   32x32 sites, `TINY` below, sized for a 2-core machine) run
   (a) in Flower's simulation runtime: `flwr run . --stream --federation-config
       num-supernodes=3` (local SuperLink, Ray);
   (b) in Flower's deployment runtime with Flower's own per-message processes:
       `flower-medimg federation up --runtime flower` (SuperLink with TLS +
       SuperNode authentication, one SuperNode per site folder on disk), then
       `flwr run . <connection> --stream`;
   (c) the same with the warm site runtime (`federation up`, the default).
   All runs use the same run config and the same synthetic sites (the site folders
   hold exactly the sites simulation generates in memory). Per message, the
   ClientApp reports `startup-s` (message in hand -> its work starts) and the peak
   memory of the process that ran it (`peak-rss-mib`, both deployment modes); the
   warm runtime also records it per site.
2. Bytes a site sends and receives per FedAvg round for three networks, counted on
   the serialized Flower records (what the Fleet API moves).

Usage: python sim/deployment_vs_simulation.py [--rounds 3] [--sites 3]
       [--image-size 32] [--samples-per-site 16] [--channels 8,16,32]
       [--local-epochs 1] [--skip-bytes] [--skip-flower-processes]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.federation import down, up

ROOT = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).with_name("flwr"))
TINY = {
    "model.channels": "8,16,32",
    "data.image-size": 32,
    "data.samples-per-site": 16,
    "train.batch-size": 4,
    "central-eval": False,
}
MODELS = {
    "UNet-2D (16,32,64,128,256)": {
        "task": "segmentation",
        "model.name": "unet",
        "model.spatial-dims": 2,
        "model.channels": "16,32,64,128,256",
    },
    "DenseNet121-2D": {
        "task": "classification",
        "model.name": "densenet121",
        "model.spatial-dims": 2,
    },
    "UNet-3D (16,32,64,128,256)": {
        "task": "segmentation",
        "model.name": "unet",
        "model.spatial-dims": 3,
        "model.channels": "16,32,64,128,256",
    },
}


# --------------------------------------------------------------------------- bytes
def serialized_bytes(record) -> int:
    """Bytes of a Flower record as the Fleet API ships it (all nested objects)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def traffic(overrides: dict) -> dict:
    """Per-site bytes of one FedAvg round (train + evaluate) for one model."""
    config = resolve_settings(overrides=overrides)
    model = model_from_settings(config)
    arrays = ArrayRecord(model.state_dict())
    train_config = ConfigRecord({"lr": 0.005, "local-epochs": 1, "server-round": 1})
    train_metrics = MetricRecord(
        {
            "num-examples": 24,
            "train-loss-before": 1.0,
            "train-loss-after": 0.5,
            "local-steps": 6,
            "nova-a": 6.0,
            "train-time-s": 1.0,
        }
    )
    eval_metrics = MetricRecord({"num-examples": 8, "dice": 0.5, "eval-time-s": 1.0})
    a, c = serialized_bytes(arrays), serialized_bytes(train_config)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "arrays": a,
        "payload": arrays.count_bytes(),
        # site -> server: train reply (arrays + metrics) + evaluate reply (metrics)
        "sent": a + serialized_bytes(train_metrics) + serialized_bytes(eval_metrics),
        # server -> site: train and evaluate instructions (arrays + config each)
        "received": 2 * (a + c),
    }


# ---------------------------------------------------------------------- wall time
def _overrides(values: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _flwr_run(args: list[str], env: dict) -> tuple[float, str]:
    """Run `flwr run .` with ``args``; return its wall time and its output."""
    started = time.perf_counter()
    proc = subprocess.run(
        [FLWR, "run", ".", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-4000:])
    return elapsed, proc.stdout + proc.stderr


def _summary(out: Path) -> dict:
    (run_dir,) = out.iterdir()
    return json.loads((run_dir / "metrics.json").read_text())


def _check_every_site_replied(out: Path, sites: int, output: str) -> None:
    """Refuse to time a run in which a site did not train and evaluate every round.

    A train reply counts when it arrived, whether or not the reply screening
    aggregated it (the site did the work): the audit log's ``reply`` lines.
    """
    (run_dir,) = out.iterdir()
    audit = [json.loads(line) for line in (run_dir / "audit.jsonl").open()]
    for entry in _summary(out)["rounds"]:
        replies = {
            "train": sum(
                e["event"] == "reply" and e["round"] == entry["round"] for e in audit
            ),
            "evaluate": len(entry["clients-evaluate"]),
        }
        for phase, count in replies.items():
            if count != sites:
                raise RuntimeError(
                    f"{out}: round {entry['round']} has {count} {phase} replies, not "
                    f"{sites}: the timing would not be of the experiment (see the "
                    "sites' state/*/site-runtime/messages.jsonl); the run's output "
                    f"ended:\n{output[-6000:]}"
                )


def _round_times(out: Path) -> list[float]:
    return [r["wall-time-s"] for r in _summary(out)["rounds"]]


def _reply_values(out: Path, key: str) -> list[float]:
    """``key`` of every train and evaluate reply of the run that reports it.

    ``startup-s``: message in hand -> work starts; ``peak-rss-mib``: the peak memory
    of the process that ran the message.
    """
    return [
        client[key]
        for entry in _summary(out)["rounds"]
        for phase in ("clients-train", "clients-evaluate")
        for client in entry[phase]
        if key in client
    ]


def _site_memory(folder: Path) -> dict[str, float]:
    """Per site: the largest peak RSS (MiB) of a warm runtime's message process."""
    peaks = {}
    for log in sorted(folder.glob("state/*/site-runtime/messages.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        values = [r["max_rss_mib"] for r in records if r.get("max_rss_mib")]
        if values:
            peaks[log.parents[1].name] = max(values)
    return peaks


def deployment(tmp: Path, run_config: dict, sites: int, runtime: str) -> dict:
    """Bring a secure local federation up, run the experiment, bring it down."""
    home = tmp / f"flwr-home-{runtime}"
    out = tmp / f"out-deployment-{runtime}"
    folder = tmp / f"federation-{runtime}"
    started = time.perf_counter()
    try:
        fed = up(
            folder,
            sites,
            flwr_home=home,
            data_options={
                "image_size": run_config["data.image-size"],
                "samples_per_site": run_config["data.samples-per-site"],
            },
            runtime=runtime,
            approve=[ROOT],
        )
        up_s = time.perf_counter() - started
        env = {**os.environ, "FLWR_HOME": str(home)}
        config = {**run_config, "output-dir": str(out)}
        run_s, output = _flwr_run(
            [fed.connection, "--stream", "--run-config", _overrides(config)], env
        )
        _check_every_site_replied(out, sites, output)
    finally:
        down(folder, grace=5)
    return {
        "up": up_s,
        "run": run_s,
        "rounds": _round_times(out),
        "startup": _reply_values(out, "startup-s"),
        "message-memory": _reply_values(out, "peak-rss-mib"),
        "memory": _site_memory(folder),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_local_superlink(home: Path) -> None:
    """SIGTERM the local SuperLink `flwr run` started under this (unique) FLWR_HOME."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(home) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)


def simulation(tmp: Path, run_config: dict, sites: int) -> dict:
    """Run the experiment with `flwr run .` in the local simulation runtime."""
    home = tmp / "flwr-home-sim"
    out = tmp / "out-simulation"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    config = {**run_config, "output-dir": str(out)}
    try:
        run_s, output = _flwr_run(
            [
                "--stream",
                "--run-config",
                _overrides(config),
                "--federation-config",
                f"num-supernodes={sites}",
            ],
            env,
        )
    finally:
        _stop_local_superlink(home)
    _check_every_site_replied(out, sites, output)
    return {"run": run_s, "rounds": _round_times(out)}


def print_traffic() -> None:
    """Print the bytes a site sends and receives per round for three networks."""
    print("== Bytes per FedAvg round per site (serialized Flower records) ==")
    print(
        f"{'model':28s} {'params':>10s} {'count_bytes':>12s} {'serialized':>11s} "
        f"{'site sends':>11s} {'site receives':>14s}"
    )
    for name, overrides in MODELS.items():
        t = traffic(overrides)
        print(
            f"{name:28s} {t['parameters']:>10,d} {t['payload'] / 1e6:>10.2f}MB "
            f"{t['arrays'] / 1e6:>9.2f}MB {t['sent'] / 1e6:>9.2f}MB "
            f"{t['received'] / 1e6:>12.2f}MB"
        )
    print(
        "count_bytes: ArrayRecord.count_bytes() (what Flower's arrays_size_mod logs); "
        "serialized: the ArrayRecord's deflated objects, identical arrays stored "
        "once. site sends = train reply (arrays + metrics) + evaluate reply; site "
        "receives = train + evaluate instructions (arrays + config each)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=TINY["data.image-size"])
    parser.add_argument(
        "--samples-per-site", type=int, default=TINY["data.samples-per-site"]
    )
    parser.add_argument("--channels", default=TINY["model.channels"])
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--skip-bytes", action="store_true")
    parser.add_argument(
        "--skip-flower-processes",
        action="store_true",
        help="leave out deployment with Flower's per-message processes (heavy rounds)",
    )
    args = parser.parse_args()
    setup = {
        **TINY,
        "data.image-size": args.image_size,
        "data.samples-per-site": args.samples_per_site,
        "model.channels": args.channels,
        "train.local-epochs": args.local_epochs,
    }

    if not args.skip_bytes:
        print_traffic()
    run_config = {
        **setup,
        "num-server-rounds": args.rounds,
        "data.num-sites": args.sites,
        "strategy.min-available-nodes": args.sites,
        "strategy.min-train-nodes": args.sites,
        "strategy.min-evaluate-nodes": args.sites,
    }
    print()
    print(
        f"== Wall time: {args.sites} sites, {args.rounds} rounds, same run config "
        f"({_overrides(setup)}) =="
    )
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average)")
    with tempfile.TemporaryDirectory(prefix="medimg-dep-vs-sim-") as tmp:
        tmp_path = Path(tmp)
        sim = simulation(tmp_path, run_config, args.sites)
        stock = (
            None
            if args.skip_flower_processes
            else deployment(tmp_path, run_config, args.sites, "flower")
        )
        warm = deployment(tmp_path, run_config, args.sites, "warm")
    print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")
    results = {
        "simulation (Ray)": sim,
        "deployment, Flower processes": stock,
        "deployment, warm site runtime": warm,
    }
    for label, res in results.items():
        if res is None:
            continue
        rounds = ", ".join(f"{s:.1f}" for s in res["rounds"])
        line = (
            f"{label:31s} flwr run: {res['run']:7.1f} s   "
            f"rounds: {sum(res['rounds']):6.1f} s ({rounds})"
        )
        if res.get("startup"):
            line += f"   start-up median {statistics.median(res['startup']):.2f} s"
        print(line)
    for label, res in (("Flower processes", stock), ("warm site runtime", warm)):
        if res is None:
            continue
        ratio = sum(res["rounds"]) / sum(sim["rounds"])
        print(f"ratio {label} / simulation: rounds {ratio:.2f}x")
        peaks = res["message-memory"]
        print(
            f"peak RSS of a message process, {label}: median "
            f"{statistics.median(peaks):.0f} MiB, max {max(peaks):.0f} MiB "
            f"({len(peaks)} replies)"
        )
    memory = ", ".join(f"{k} {v:.0f} MiB" for k, v in warm["memory"].items())
    print(f"peak RSS of a warm message process per site: {memory}")
    print(
        "round ratio deployment/simulation: "
        f"{sum(warm['rounds']) / sum(sim['rounds']):.2f}"
    )
    print(
        "site start-up per message (median s): "
        f"{statistics.median(warm['startup']):.2f}"
    )


if __name__ == "__main__":
    main()
