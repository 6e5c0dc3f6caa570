"""What the site's admission checks cost per message, next to what a message does.

The warm site runtime checks every message before any of the app's code runs
(:class:`flower_medimg.site.admission.Admission`): the app's approval, the site
policy, and for a train message the privacy ledger (ε of the round composed with
every earlier charge by one RDP accountant, then the charge appended). This script
times, round-robin in one process with torch pinned to one thread:

- ``approval``: an evaluate message, approvals only (no policy file);
- ``policy``: an evaluate message checked against a policy file;
- ``policy+ledger``: a DP-SGD train message with a site-wide budget, charged each
  time (the ledger grows by one line per call, as over a long study);
- baseline ``train-step``: one forward/backward/Adam step of the default 2D UNet
  on one batch of the site's images, a lower bound on what a train message does.

Run: ``python benchmarks/admission.py [--repeats 200]``. Prints medians (ms), the
ratio of each check to the baseline, and the load (``uptime``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.supercore.fab import Fab  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from flower_medimg.core import protocol  # noqa: E402
from flower_medimg.core.models import model_from_settings  # noqa: E402
from flower_medimg.core.settings import resolve_settings  # noqa: E402
from flower_medimg.core.tasks import get_task  # noqa: E402
from flower_medimg.data.datasets import site_datasets  # noqa: E402
from flower_medimg.data.site_folder import write_synthetic_sites  # noqa: E402
from flower_medimg.site.admission import Admission  # noqa: E402
from flower_medimg.site.approvals import approve  # noqa: E402

POLICY = """[policy]
require-dp-sgd = true
max-epsilon-per-run = 1000.0
max-total-epsilon = 100000.0
delta = 1e-5
min-train-samples = 4
allowed-strategies = ["fedavg"]
allowed-tasks = ["segmentation"]
max-update-mib = 64
"""
RUN_CONFIG = {"dp.noise-multiplier": 1.0, "train.batch-size": 4}


def _message(kind: str, arrays: ArrayRecord) -> Message:
    content = {protocol.RECORD_CONFIG: ConfigRecord({protocol.CONFIG_SERVER_ROUND: 1})}
    if kind == "train":
        content[protocol.RECORD_ARRAYS] = arrays
    return Message(RecordDict(content), dst_node_id=1, message_type=kind)


def _context(run_id: int, site: Path, state: Path) -> Context:
    return Context(
        run_id=run_id,
        node_id=1,
        node_config={
            protocol.NODE_DATA_DIR: str(site),
            protocol.NODE_STATE_DIR: str(state),
        },
        state=RecordDict(),
        run_config=RUN_CONFIG,
    )


def main() -> None:
    """Time the checks round-robin and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Messages are made as Flower makes them inside a task (a server task here).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    root = Path(tempfile.mkdtemp(prefix="admission-bench-"))
    (site,) = write_synthetic_sites(root / "sites", "segmentation", 1)
    settings = resolve_settings(RUN_CONFIG)
    model = model_from_settings(settings)
    arrays = ArrayRecord(
        {k: Array(v.detach().numpy()) for k, v in model.state_dict().items()}
    )
    fab = Fab(hashlib.sha256(b"app").hexdigest(), b"app", {})
    run = Run.create_empty(1)
    run.fab_id = "hospital/study-a"
    states = {name: root / name for name in ("approval", "policy", "policy+ledger")}
    for state in states.values():
        approve(state, fab.hash_str)
    policy = root / "policy.toml"
    policy.write_text(POLICY)
    admissions = {
        "approval": Admission(states["approval"]),
        "policy": Admission(states["policy"], policy),
        "policy+ledger": Admission(states["policy+ledger"], policy),
    }
    kinds = {"approval": "evaluate", "policy": "evaluate", "policy+ledger": "train"}
    train, _ = site_datasets(settings, {protocol.NODE_DATA_DIR: str(site)})
    batch = torch.utils.data.default_collate([train[i] for i in range(4)])
    loss_fn = get_task(settings["task"]).loss_fn()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        optimiser.zero_grad()
        loss_fn(model(batch["image"]), batch["label"]).backward()
        optimiser.step()

    times: dict[str, list[float]] = {name: [] for name in [*admissions, "train-step"]}
    train_step()  # first-use costs out of the timings
    for name, admission in admissions.items():
        admission.check(
            _message(kinds[name], arrays), _context(1, site, states[name]), run, fab
        )
    for _ in range(args.repeats):
        for name, admission in admissions.items():
            message = _message(kinds[name], arrays)
            context = _context(1, site, states[name])
            start = time.perf_counter()
            admission.check(message, context, run, fab)
            times[name].append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        train_step()
        times["train-step"].append(1000 * (time.perf_counter() - start))
    baseline = statistics.median(times["train-step"])
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    print(f"load: {load.strip()}")
    print(f"{'check':<16}{'median ms':>12}{'p90 ms':>10}{'/ train-step':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        p90 = float(np.percentile(values, 90))
        print(f"{name:<16}{median:>12.2f}{p90:>10.2f}{median / baseline:>14.3f}")


if __name__ == "__main__":
    main()
