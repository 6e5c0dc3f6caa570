"""What a site's train call costs with and without the loss passes.

Before the renovation every train call evaluated the training loss before and after
local training (two extra passes over the site's data) whether or not the strategy
read them. Now a site computes them only when the train config asks for them
(FedCostWAvg and FedFocus ask, as does ``train.report-losses = true``).

One site, the default 2D UNet, a synthetic site folder: the built-in ClientApp gets
the same train message without and with the request, alternating, on one torch
thread; the medians and their ratio are printed with the load average.

Usage: python benchmarks/train_call.py [--repeats 7] [--samples 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from flower_medimg.client_apps import make_client_app
from flower_medimg.core import protocol
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.data import synthetic_site, write_site_folder


def _train_seconds(
    app: ClientApp, arrays: ArrayRecord, data_dir: str, request: list[str]
) -> float:
    """Send one train message asking for ``request`` to ``app``; return its time."""
    config = {protocol.CONFIG_SERVER_ROUND: 1}
    if request:
        config[protocol.CONFIG_REQUEST_METRICS] = request
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    message = Message(content=content, dst_node_id=1, message_type="train")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"data-dir": data_dir},
        state=RecordDict(),
        run_config={},
    )
    started = time.perf_counter()
    reply = app(message, context)
    seconds = time.perf_counter() - started
    if reply.has_error():
        raise RuntimeError(f"train reply is an error: {reply.error}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    print(f"load average before: {os.getloadavg()}")
    settings = resolve_settings(overrides={"data.samples-per-site": args.samples})
    arrays = ArrayRecord(model_from_settings(settings).state_dict())
    app = make_client_app()
    losses = [protocol.METRIC_TRAIN_LOSS_BEFORE, protocol.METRIC_TRAIN_LOSS_AFTER]
    variants = {"losses off (now)": [], "losses on (before)": losses}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as work:
        site = synthetic_site(
            "segmentation", 0, 1, samples_per_site=args.samples, image_size=64
        )
        write_site_folder(site, Path(work), "segmentation")
        for request in variants.values():  # warm-up: first-call costs
            _train_seconds(app, arrays, work, request)
        names = list(variants)
        for repeat in range(args.repeats):
            for name in names if repeat % 2 else names[::-1]:
                times[name].append(_train_seconds(app, arrays, work, variants[name]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:<20} train call {median:.3f} s (median of {args.repeats})")
    off, on = medians.values()
    print(
        f"before / now: {on / off:.2f}; the loss passes were {1 - off / on:.0%} of a "
        f"train call ({args.samples} samples, 64x64, 1 torch thread)"
    )
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
