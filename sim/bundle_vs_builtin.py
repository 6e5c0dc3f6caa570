"""Round time at a site: the MONAI-bundle ClientApp vs the built-in ClientApp.

Both ClientApps get the same Flower train and evaluate messages (the same global
arrays) at one site with the same site folder on disk (``node_config["data-dir"]``,
synthetic NIfTI images): the bundle ClientApp runs ``sim/tiny_bundle.py``'s bundle
through MONAI's ``MonaiAlgo`` (``node_config["bundle-root"]``, as a deployed site),
the built-in one trains ``model.name = "unet"`` with our own loop. The networks are
the same (a 2D UNet, instance norm, the same channels: the global keys and shapes
are checked to match), and so are loss (DiceCE), optimizer (Adam, the same lr),
batch size and one local epoch. The variants alternate, the order flips each
repeat, torch runs on one thread, and the medians are compared.

Usage: python sim/bundle_vs_builtin.py [--repeats 7] [--samples 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_medimg.client_apps import make_bundle_client_app, make_client_app
from flower_medimg.core.bundle import bundle_model, check_global_arrays
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.data import synthetic_site, write_site_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_bundle import write_tiny_bundle  # noqa: E402

SHARED = {"data.image-size": 32, "train.batch-size": 4, "train.local-epochs": 1}
PHASES = ("train", "evaluate")


def _message(arrays: ArrayRecord, phase: str, server_round: int) -> Message:
    config = ConfigRecord({"server-round": server_round})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content=content, dst_node_id=1, message_type=phase)


def _context(node_config: dict) -> Context:
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )


def _round(app: Callable, arrays: ArrayRecord, node: dict, rnd: int) -> list[float]:
    """Time one train and one evaluate message; return the two wall times."""
    times = []
    for phase in PHASES:
        started = time.perf_counter()
        reply = app(_message(arrays, phase, rnd), _context(node))
        times.append(time.perf_counter() - started)
        if reply.has_error():
            raise RuntimeError(f"{phase} reply is an error: {reply.error}")
    return times


def _setup(work: Path, samples: int, channels: Sequence[int]) -> tuple:
    """Write the site folder and the bundle; return apps, arrays and node configs."""
    site = work / "site"
    data = synthetic_site("segmentation", 0, 1, samples_per_site=samples, image_size=32)
    write_site_folder(data, site, "segmentation")
    root = write_tiny_bundle(work / "bundle", channels=channels, batch_size=4)
    bundle_config = {**SHARED, "task": "bundle", "bundle.root": str(root)}
    builtin_config = {
        **SHARED,
        "task": "segmentation",
        "model.name": "unet",
        "model.norm": "instance",
        "model.channels": ",".join(map(str, channels)),
    }
    network = bundle_model(resolve_settings(overrides=bundle_config))
    builtin = model_from_settings(resolve_settings(overrides=builtin_config))
    check_global_arrays(builtin.state_dict(), network, source="the built-in UNet")
    arrays = ArrayRecord(network.state_dict())
    apps = {
        "bundle": (
            make_bundle_client_app(**bundle_config),
            {"data-dir": str(site), "bundle-root": str(root)},
        ),
        "built-in": (make_client_app(**builtin_config), {"data-dir": str(site)}),
    }
    return apps, arrays


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--channels", default="4,8,16")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    print(f"load average before: {os.getloadavg()}")
    channels = [int(c) for c in args.channels.split(",")]
    times: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as work:
        apps, arrays = _setup(Path(work), args.samples, channels)
        names = list(apps)
        for app, node in apps.values():  # warm-up: imports and first-call costs
            _round(app, arrays, node, 0)
        for rnd in range(1, args.repeats + 1):
            for name in names if rnd % 2 else names[::-1]:
                app, node = apps[name]
                times.setdefault(name, []).append(_round(app, arrays, node, rnd))
    medians = {}
    print(f"{'ClientApp':<10} {'train s':>8} {'evaluate s':>10} {'round s':>8}")
    for name, rows in times.items():
        train, evaluate = (statistics.median(col) for col in zip(*rows, strict=True))
        medians[name] = statistics.median(sum(r) for r in rows)
        print(f"{name:<10} {train:>8.3f} {evaluate:>10.3f} {medians[name]:>8.3f}")
    print(
        f"round time bundle / built-in: {medians['bundle'] / medians['built-in']:.2f} "
        f"(medians of {args.repeats} interleaved repeats, {args.samples} samples, "
        f"channels {args.channels}, 1 torch thread)"
    )
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
