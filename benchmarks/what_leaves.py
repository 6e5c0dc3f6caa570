"""What leaves a hospital, and what it costs: plain FedAvg vs SecAgg+, CKKS, codecs.

One FedAvg round per cell, in this process: each site's mod (SecAggPlusMod,
HomomorphicEncryptionMod, CompressionMod) and the server's wrapper (SecAggPlus,
HomomorphicFedAvg, DecompressUpdates around Flower's FedAvg) exchange real Flower
Messages through an in-process grid, so the figures are the protocol's own costs
without Flower's transport or the training itself (the sites' "training" adds a
fixed random update to the model they received). Per cell:

- bytes a site sends (all its replies of the round: masked arrays, keys, encrypted
  shares, ciphertexts, codec side data) and receives (the train message and, for
  SecAgg+, its exchanges), from the records' array data and bytes values;
- site time (mean over the sites of the time spent in their mods) and server time
  (the round's wall time less the sites' time), each as a ratio to plain FedAvg's;
- the round's peak traced memory (tracemalloc: every Python object and numpy
  buffer allocated during the round, whatever the allocator reuses; every site's
  replies and the server's working arrays live in this one process). TenSEAL's
  native working memory is not traced (its serialised ciphertexts are).

Each cell runs two rounds and reports the second (the steady state: CKKS then
sends an encrypted global model, top-k carries a residual).

Variants are interleaved (round-robin over the repeats) and medians reported;
torch and BLAS run on one thread. CKKS is run only for models up to
``--ckks-max-params`` values (encryption is ~1 s per million values per site here).

Usage: python benchmarks/what_leaves.py [--sites 4,10,30]
       [--models unet,densenet121,unet-30m] [--repeats 3] [--ckks-max-params 2e6]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from flower_medimg.core.homomorphic import provision_contexts  # noqa: E402
from flower_medimg.core.models import model_from_settings  # noqa: E402
from flower_medimg.core.settings import resolve_settings  # noqa: E402
from flower_medimg.privacy import (  # noqa: E402
    CompressionMod,
    HomomorphicEncryptionMod,
    SecAggPlusMod,
)
from flower_medimg.strategies import (  # noqa: E402
    DecompressUpdates,
    HomomorphicFedAvg,
    SecAggPlus,
)

torch.set_num_threads(1)

MODELS = {
    "unet": {},
    "densenet121": {"task": "classification", "model.name": "densenet121"},
    "unet-30m": {"model.channels": "68,136,272,544,1088"},
}
VARIANTS = ("plain", "fp16", "int8", "topk-10%", "secagg", "secagg+int8", "ckks")


def _bytes(message: Message) -> int:
    """Array data and bytes values a message carries."""
    if message.has_error():
        return 0
    total = sum(
        len(array.data)
        for record in message.content.array_records.values()
        for array in record.values()
    )
    return total + sum(
        len(value)
        for record in message.content.config_records.values()
        for value in record.values()
        if isinstance(value, bytes)
    )


class InProcessGrid:
    """Deliver each message to its site's mod in this process, timing the site."""

    def __init__(self, updates: dict[int, dict[str, np.ndarray]], mods: dict) -> None:
        self.updates, self.mods = updates, mods
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in updates}
        self.reset()

    def reset(self) -> None:
        """Start counting a new round."""
        self.site_time = dict.fromkeys(self.updates, 0.0)
        self.sent = dict.fromkeys(self.updates, 0)
        self.received = dict.fromkeys(self.updates, 0)

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def _train(self, msg: Message, context: Context) -> Message:
        sent = msg.content["arrays"]
        update = self.updates[context.node_id]
        arrays = ArrayRecord({k: Array(sent[k].numpy() + update[k]) for k in sent})
        metrics = MetricRecord({"num-examples": 10 + context.node_id})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for sent in messages:
            node = sent.metadata.dst_node_id
            # each site gets its own copy, as after Flower's transport (strategies
            # send one RecordDict to all, and mods may replace its records)
            msg = Message(
                RecordDict(dict(sent.content.items())), metadata=sent.metadata
            )
            self.received[node] += _bytes(msg)
            started = time.perf_counter()
            reply = self.mods[node](msg, self.contexts[node], self._train)
            self.site_time[node] += time.perf_counter() - started
            self.sent[node] += _bytes(reply)
            replies.append(reply)
        return replies


def _passthrough(msg, context, call_next):
    return call_next(msg, context)


def _setup(variant: str, n: int, he_dir: Path):
    """Return (server strategy, mod factory) of a variant."""
    fedavg = FedAvg(min_available_nodes=n, min_train_nodes=n)
    if variant == "plain":
        return fedavg, lambda: _passthrough
    if variant in ("fp16", "int8", "topk-10%"):
        codec = variant.split("-")[0]
        return (
            DecompressUpdates(fedavg, codec, 0.1),
            lambda: CompressionMod(codec, 0.1),
        )
    if variant.startswith("secagg"):
        bits = 8 if variant.endswith("int8") else 24
        shares = min(n, 2 * math.ceil(math.log2(n)) + 1)  # SecAgg+'s O(log n)
        return (
            SecAggPlus(fedavg, num_shares=shares, quantization_bits=bits),
            SecAggPlusMod,
        )
    return (
        HomomorphicFedAvg(fedavg, he_dir / "he-public.ctx"),
        lambda: HomomorphicEncryptionMod(he_dir / "he-secret.ctx"),
    )


def run_cell(variant, arrays, updates, he_dir) -> dict:
    """Two rounds of ``variant``; return the second's bytes, times and memory.

    The second round is the steady state: CKKS then sends the sites an encrypted
    global model, and top-k carries a residual.
    """
    n = len(updates)
    strategy, make_mod = _setup(variant, n, he_dir)
    grid = InProcessGrid(updates, {node: make_mod() for node in updates})
    for server_round in (1, 2):
        grid.reset()
        tracemalloc.start()
        started = time.perf_counter()
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        )
        replies = grid.send_and_receive(messages)
        aggregate, _ = strategy.aggregate_train(server_round, replies)
        wall = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert aggregate is not None, f"{variant}: the round aggregated nothing"
        arrays = aggregate
        del messages, replies  # the next round starts from what it must hold
    site_total = sum(grid.site_time.values())
    return {
        "sent": statistics.mean(grid.sent.values()),
        "received": statistics.mean(grid.received.values()),
        "site": site_total / n,
        "server": wall - site_total,
        "peak": peak,
    }


def _model_arrays(name: str) -> ArrayRecord:
    model = model_from_settings(resolve_settings(overrides=MODELS[name]))
    return ArrayRecord(
        {k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()}
    )


def _updates(arrays: ArrayRecord, n: int) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        node: {
            k: (rng.standard_normal(arrays[k].shape) * 1e-3).astype(
                arrays[k].numpy().dtype
            )
            if np.issubdtype(arrays[k].numpy().dtype, np.floating)
            else np.zeros(arrays[k].shape, arrays[k].numpy().dtype)
            for k in arrays
        }
        for node in range(1, n + 1)
    }


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="4,10,30")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ckks-max-params", type=float, default=2e6)
    args = parser.parse_args()
    variants = args.variants.split(",")
    # messages are built outside a Flower runtime: give them an identity
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    print("load before:", _uptime())
    with tempfile.TemporaryDirectory() as tmp:
        he_dir = Path(tmp)
        provision_contexts(he_dir)
        for model in args.models.split(","):
            arrays = _model_arrays(model)
            values = sum(math.prod(arrays[k].shape) for k in arrays)
            for n in (int(s) for s in args.sites.split(",")):
                updates = _updates(arrays, n)
                cell = [
                    v for v in variants if v != "ckks" or values <= args.ckks_max_params
                ]
                runs: dict[str, list[dict]] = {v: [] for v in cell}
                for _ in range(args.repeats):  # round-robin
                    for variant in cell:
                        runs[variant].append(run_cell(variant, arrays, updates, he_dir))
                _print_table(model, values, n, runs, variants)
    print("load after:", _uptime())


def _print_table(model, values, n, runs, variants) -> None:
    med = {
        v: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for v, rs in runs.items()
    }
    plain = med["plain"]
    print(f"\n{model} ({values / 1e6:.2f} M values), {n} sites")
    print(
        f"{'variant':<13}{'sent MB':>9}{'x fewer':>8}{'recv MB':>9}{'site s':>9}"
        f"{'server s':>10}{'/ plain':>9}{'peak MiB':>10}{'/ plain':>8}"
    )
    for variant in variants:
        if variant not in med:
            print(f"{variant:<13}  skipped (> --ckks-max-params values)")
            continue
        r = med[variant]
        print(
            f"{variant:<13}{r['sent'] / 1e6:>9.2f}{plain['sent'] / r['sent']:>8.2f}"
            f"{r['received'] / 1e6:>9.2f}{r['site']:>9.3f}{r['server']:>10.3f}"
            f"{r['server'] / plain['server']:>9.2f}{r['peak'] / 2**20:>10.1f}"
            f"{r['peak'] / plain['peak']:>8.2f}"
        )


if __name__ == "__main__":
    main()
