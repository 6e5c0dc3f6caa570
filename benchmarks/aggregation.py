"""Server-side aggregation: our strategies next to Flower's, on identical replies.

For each model and number of clients N, every strategy's ``aggregate_train`` runs on
the same N reply Messages (rebuilt before each call: some Flower strategies consume
their input), after one warm-up call. Printed per strategy: median time, payload
throughput (N x model bytes / time), peak extra memory of one call (tracemalloc),
and the ratios to Flower's FedAvg and to a plain numpy weighted sum
(``weights @ X`` over a pre-stacked (N, d) float32 matrix; stacking not timed). The
row "numpy from replies" is the plain numpy path from the same Messages
(``Array.numpy()``, concatenate, stack, ``w @ X``).

Quick run (a few minutes on 2 cores)::

    python benchmarks/aggregation.py --quick

Full run (long; needs ~20 GB of memory for the 30M-parameter model at N = 50)::

    python benchmarks/aggregation.py

The cost of the gate in front of our own strategy, both with the default run
config's screening (``gate.*``), timed round-robin (BLAS pinned to one thread)::

    python benchmarks/aggregation.py --gate-overhead --models unet --clients 3,10
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, Krum, MultiKrum

from flower_medimg.strategies import (
    DistanceOutlierSuppression,
    FastFedAvg,
    FastFedMedian,
    FastFedTrimmedAvg,
    FedCostWAvg,
    FedFocus,
    FedNova,
    QualityGate,
)

MODELS = {
    "unet": "MONAI UNet-2D (16..256, 2 res units)",
    "densenet": "MONAI DenseNet121-2D",
    "unet-wide": "MONAI UNet-2D (68..1088, 2 res units)",
}


def build_model(name: str) -> dict[str, np.ndarray]:
    """State dict (numpy) of a benchmark model."""
    import torch  # noqa: PLC0415 (only needed to build the models)
    from monai.networks.nets import DenseNet121, UNet  # noqa: PLC0415

    torch.manual_seed(0)
    if name == "unet":
        model = UNet(2, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    elif name == "densenet":
        model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    elif name == "unet-wide":
        model = UNet(2, 1, 2, (68, 136, 272, 544, 1088), (2, 2, 2, 2), num_res_units=2)
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def make_arrays(state: dict[str, np.ndarray], num: int) -> list[dict[str, Array]]:
    """Serialised arrays of ``num`` clients: the model plus small noise."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(num):
        arrays = {}
        for key, value in state.items():
            if value.dtype.kind == "f":
                noise = rng.standard_normal(value.shape, dtype=np.float32) * 0.01
                value = value + noise.astype(value.dtype)
            arrays[key] = Array(np.ascontiguousarray(value))
        out.append(arrays)
    return out


def make_replies(client_arrays: list[dict[str, Array]]) -> list[Message]:
    """Fresh reply Messages sharing the serialised bytes."""
    replies = []
    for node, arrays in enumerate(client_arrays, start=1):
        metrics = MetricRecord(
            {
                "num-examples": 10 + node,
                "train-loss-before": 1.0,
                "train-loss-after": 0.5 + 0.01 * node,
                "nova-a": 4.0,
                "local-steps": 4,
            }
        )
        content = RecordDict({"arrays": ArrayRecord(dict(arrays)), "metrics": metrics})
        metadata = Metadata(
            run_id=1,
            message_id="",
            src_node_id=node,
            dst_node_id=0,
            reply_to_message_id="",
            group_id="1",
            created_at=0.0,
            ttl=60.0,
            message_type="train",
        )
        replies.append(Message(content, metadata=metadata))
    return replies


def numpy_from_replies(replies: list[Message], weights: np.ndarray) -> np.ndarray:
    """The plain numpy path from reply Messages: deserialise, stack, ``w @ X``."""
    stacked = np.stack(
        [
            np.concatenate(
                [
                    a.numpy().ravel().astype(np.float32)
                    for a in msg.content["arrays"].values()
                ]
            )
            for msg in replies
        ]
    )
    return weights @ stacked


def strategies(num: int, global_arrays: ArrayRecord) -> dict[str, Callable]:
    """Name -> factory of a strategy ready to aggregate (global arrays known)."""
    f = max(1, num // 10)

    def ours(factory: Callable) -> Callable:
        def make():  # noqa: ANN202
            strategy = factory()
            strategy.current_arrays = global_arrays
            return strategy

        return make

    return {
        "flwr FedAvg": FedAvg,
        "flwr FedMedian": FedMedian,
        "flwr Krum": lambda: Krum(num_malicious_nodes=f),
        "flwr MultiKrum": lambda: MultiKrum(
            num_malicious_nodes=f, num_nodes_to_select=num - f
        ),
        "flwr Bulyan": lambda: Bulyan(num_malicious_nodes=f),
        "FastFedAvg": ours(FastFedAvg),
        "FedCostWAvg": ours(FedCostWAvg),
        "FedFocus": ours(FedFocus),
        "FedNova": ours(FedNova),
        "DOS": ours(DistanceOutlierSuppression),
        "FastFedMedian": ours(FastFedMedian),
        "FastFedTrimmedAvg": ours(FastFedTrimmedAvg),
        "QualityGate(FastFedAvg)": ours(lambda: QualityGate(FastFedAvg())),
        "QualityGate(flwr FedAvg)": ours(lambda: QualityGate(FedAvg())),
    }


def default_screening() -> dict:
    """The reply checks of the default run config (``gate.*``) as keyword arguments."""
    from flower_medimg.core.settings import resolve_settings  # noqa: PLC0415
    from flower_medimg.server_app import screening_parameters  # noqa: PLC0415

    return screening_parameters(resolve_settings())


def gate_overhead(model_name: str, num: int, repeats: int) -> None:
    """Time FastFedAvg and QualityGate(FastFedAvg), default screening, round-robin."""
    state = build_model(model_name)
    client_arrays = make_arrays(state, num)
    global_arrays = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in state.items()}
    )
    checks = default_screening()
    variants = {
        "FastFedAvg": lambda: FastFedAvg(**checks),
        "QualityGate(FastFedAvg)": lambda: QualityGate(FastFedAvg(**checks), **checks),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(repeats + 1):  # the first pass is the warm-up
        for name, factory in variants.items():
            strategy = factory()
            strategy.current_arrays = global_arrays
            replies = make_replies(client_arrays)
            gc.collect()
            start = time.perf_counter()
            strategy.aggregate_train(1, replies)
            if index:
                times[name].append(time.perf_counter() - start)
    ours, gated = (statistics.median(t) for t in times.values())
    print(
        f"{MODELS[model_name]}, N = {num}: FastFedAvg {ours * 1e3:.1f} ms, "
        f"QualityGate(FastFedAvg) {gated * 1e3:.1f} ms (median of {repeats}, "
        f"round-robin): ratio {gated / ours:.3f}"
    )


def time_call(fn: Callable[[], object], prepare: Callable[[], object], repeats: int):
    """Median seconds of ``fn(prepare())`` after one warm-up; peak MiB of one call."""
    fn(prepare())
    times = []
    for _ in range(repeats):
        arg = prepare()
        gc.collect()
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
        del arg
    arg = prepare()
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn(arg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak / 2**20


def run(model_name: str, num: int, repeats: int, only: set[str] | None) -> None:
    """Benchmark every strategy for one model and number of clients."""
    state = build_model(model_name)
    client_arrays = make_arrays(state, num)
    global_arrays = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in state.items()}
    )
    payload = sum(len(a.data) for arrays in client_arrays for a in arrays.values())
    params = sum(v.size for v in state.values())
    print(
        f"\n## {MODELS[model_name]}: {params / 1e6:.2f}M params, "
        f"{len(state)} tensors, N = {num}, payload {payload / 2**20:.0f} MiB"
    )

    # Reference: plain numpy weighted sum over a pre-stacked float32 matrix
    flat = np.stack(
        [
            np.concatenate(
                [a.numpy().ravel().astype(np.float32) for a in arrays.values()]
            )
            for arrays in client_arrays
        ]
    )
    weights = np.full(num, 1.0 / num, dtype=np.float32)
    t_numpy, m_numpy = time_call(lambda x: weights @ x, lambda: flat, repeats)
    results = {"numpy w @ X": (t_numpy, m_numpy)}
    results["numpy from replies"] = time_call(
        lambda replies: numpy_from_replies(replies, weights),
        lambda: make_replies(client_arrays),
        repeats,
    )

    for name, factory in strategies(num, global_arrays).items():
        if only and name not in only and name != "flwr FedAvg":
            continue
        results[name] = time_call(
            lambda replies, factory=factory: factory().aggregate_train(1, replies),
            lambda: make_replies(client_arrays),
            repeats,
        )

    t_fedavg = results["flwr FedAvg"][0]
    print(
        f"{'strategy':26s} {'time ms':>9s} {'GB/s':>7s} {'peak MiB':>9s} "
        f"{'x faster than flwr FedAvg':>26s} {'x numpy sum time':>17s}"
    )
    for name, (seconds, peak) in results.items():
        print(
            f"{name:26s} {seconds * 1e3:9.1f} {payload / seconds / 1e9:7.2f} "
            f"{peak:9.1f} {t_fedavg / seconds:26.2f} {seconds / t_numpy:17.2f}"
        )


def main() -> None:
    """Parse the command line and run the benchmark grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,20,50", help="comma-separated N")
    parser.add_argument("--models", default=",".join(MODELS), help=", ".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated strategy names")
    parser.add_argument(
        "--gate-overhead",
        action="store_true",
        help="QualityGate(FastFedAvg) / FastFedAvg with the default screening",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N = 10, 20; UNet and DenseNet121; 3 repeats",
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.models, args.repeats = "10,20", "unet,densenet", 3
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if args.gate_overhead:
        import torch  # noqa: PLC0415

        torch.set_num_threads(1)
        print(f"load: {os.getloadavg()}")
        for model_name in args.models.split(","):
            for num in (int(n) for n in args.clients.split(",")):
                gate_overhead(model_name.strip(), num, args.repeats)
        print(f"load: {os.getloadavg()}")
        return
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    print(f"numpy {np.__version__}; repeats {args.repeats} (median), 1 warm-up")
    for model_name in args.models.split(","):
        for num in (int(n) for n in args.clients.split(",")):
            run(model_name.strip(), num, args.repeats, only)


if __name__ == "__main__":
    main()
