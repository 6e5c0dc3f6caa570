"""Cost of the server's integrity checks per round, next to the round's aggregation.

Per round the ServerApp signs and writes the resume state and the registry record
(:meth:`ModelRegistry.record_round`), signs a few audit lines, and a restart
verifies what it loads. For one model, interleaved over ``--repeats``:

- ``aggregate``: ``QualityGate(FastFedAvg()).aggregate_train`` on N reply Messages
  (the default gated path), the reference;
- ``record``: ``ResumeState.to_bytes`` + ``record_round`` (safetensors files written
  with fsync, one SQLite transaction, signed rows), of which ``record: integrity``
  is the part the integrity adds (tensor and file SHA-256s, two Ed25519 signatures);
- ``load``: ``load_resume_state`` + ``ResumeState.from_bytes`` + ``load_weights``,
  of which ``load: integrity`` is the checking (two signature verifications, the
  file and tensor SHA-256s);
- ``audit lines``: signing and appending the round's N + 2 audit lines.

Printed: median ms of each, its ratio to ``aggregate``, and ``uptime`` before and
after (the machine is shared). torch, BLAS and OpenMP run on one thread.

    python benchmarks/integrity_cost.py --model tiny
    python benchmarks/integrity_cost.py --model unet-wide    # ~30M parameters
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from aggregation import build_model, make_arrays, make_replies  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from flower_medimg.core.models import model_from_settings  # noqa: E402
from flower_medimg.core.settings import resolve_settings  # noqa: E402
from flower_medimg.lifecycle.audit import AuditLog  # noqa: E402
from flower_medimg.lifecycle.integrity import ServerKey  # noqa: E402
from flower_medimg.lifecycle.registry import (  # noqa: E402
    ModelRegistry,
    _payload,
    weights_sha256,
)
from flower_medimg.lifecycle.resume_state import ResumeState  # noqa: E402
from flower_medimg.strategies import FastFedAvg, QualityGate  # noqa: E402

#: The TINY model of the tests.
TINY = {"model.channels": "4,8,16", "data.image-size": 32}


def model_state(name: str) -> dict[str, np.ndarray]:
    """Numpy state dict of the TINY model or a model of ``aggregation.py``."""
    if name == "tiny":
        torch.manual_seed(0)
        model = model_from_settings(resolve_settings(overrides=TINY))
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return build_model(name)


def resume_state(server_round: int) -> bytes:
    """A FedAvg run's resume state after ``server_round`` (no strategy arrays)."""
    return ResumeState(
        round=server_round,
        strategy=[{"class": "flwr.FedAvg", "fields": {}}],
        stop={"best": 0.5, "best-round": 1, "stale-rounds": 0},
        best={"best": 0.5, "best-round": 1},
        recorder={r: {"clients-train": [{"loss": 0.1}] * 3} for r in range(1, 4)},
        history={"train_metrics_clientapp": {1: {"loss": 0.25}}},
    ).to_bytes()


class Bench:
    """One model's registry, replies and key; each method is one timed operation."""

    def __init__(self, state: dict[str, np.ndarray], num: int, folder: Path) -> None:
        self.key = ServerKey.load_or_create(folder / "key" / "server.pem")
        self.registry = ModelRegistry(folder / "registry", self.key)
        self.run = self.registry.start_run(
            flower_run_id=1,
            experiment="bench",
            run_dir=folder,
            strategy="fedavg",
            config={},
        )
        self.tensors = {k: torch.from_numpy(v) for k, v in state.items()}
        self.client_arrays = make_arrays(state, num)
        self.global_arrays = ArrayRecord(
            {k: a for k, a in self.client_arrays[0].items()}
        )
        self.audit = AuditLog(folder / "audit.jsonl", self.key)
        self.num = num
        self.round = 0
        self.version = self.record()
        self.row = self.registry.version(self.version)
        self.weights = safetensors.torch.save(self.tensors)
        self.state = resume_state(1)

    def aggregate(self) -> None:
        gate = QualityGate(FastFedAvg())
        gate.current_arrays = self.global_arrays
        gate.strategy.current_arrays = self.global_arrays
        gate.aggregate_train(1, make_replies(self.client_arrays))

    def record(self) -> int:
        self.round += 1
        version, _ = self.registry.record_round(
            self.run,
            self.round,
            self.tensors,
            metrics={"central/dice": 0.5},
            contributors=list(range(1, self.num + 1)),
            replies=[{"node_id": n, "accepted": True} for n in range(self.num)],
            epsilon=None,
            resume_state=resume_state(self.round),
            best=False,
            keep="best+last",
            audit_head=self.audit.head,
            audit_lines=self.audit.seq,
        )
        self.version = version
        return version

    def record_integrity(self) -> None:
        weights_sha256(self.tensors)
        hashlib.sha256(self.weights).hexdigest()
        hashlib.sha256(self.state).hexdigest()
        self.key.sign(_payload("models", self.row))
        self.key.sign(_payload("models", self.row))  # the previous one, re-signed

    def load(self) -> None:
        ResumeState.from_bytes(self.registry.load_resume_state(self.version))
        self.registry.load_weights(self.version)

    def load_integrity(self) -> None:
        for _ in range(2):  # version and run, each when the state and the weights load
            self.registry.signature_ok("models", self.row)
            self.registry.signature_ok("runs", self.row["run-info"])
        hashlib.sha256(self.weights).hexdigest()
        hashlib.sha256(self.state).hexdigest()
        weights_sha256(self.tensors)

    def audit_lines(self) -> None:
        self.audit.append("round-sampled", round=self.round, nodes=[1, 2, 3])
        for node in range(self.num):
            self.audit.append("reply", round=self.round, node_id=node, accepted=True)
        self.audit.append("model-stored", round=self.round, version=self.version)


def interleaved(operations: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Median seconds of each operation, the operations interleaved per repeat."""
    for operation in operations.values():  # warm-up
        operation()
    times: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(repeats):
        for name, operation in operations.items():
            start = time.perf_counter()
            operation()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def uptime() -> str:
    """The machine's load (``uptime``)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    """Measure and print one model's integrity costs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="tiny", help="tiny, unet, unet-wide, ...")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    state = model_state(args.model)
    params = sum(v.size for v in state.values())
    print(f"before: {uptime()}")
    print(f"model {args.model}: {params / 1e6:.2f}M parameters, N = {args.clients}")
    with tempfile.TemporaryDirectory() as folder:
        bench = Bench(state, args.clients, Path(folder))
        medians = interleaved(
            {
                "aggregate": bench.aggregate,
                "record": bench.record,
                "record: integrity": bench.record_integrity,
                "load": bench.load,
                "load: integrity": bench.load_integrity,
                "audit lines": bench.audit_lines,
            },
            args.repeats,
        )
        bench.registry.close()
    reference = medians["aggregate"]
    print(f"{'operation':<20} {'median ms':>10} {'/ aggregate':>12}")
    for name, seconds in medians.items():
        print(f"{name:<20} {seconds * 1e3:>10.2f} {seconds / reference:>12.3f}")
    print(f"after: {uptime()}")


if __name__ == "__main__":
    main()
