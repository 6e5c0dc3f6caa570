"""ClientApps that train and evaluate MONAI models at a site.

One ClientApp serves both tasks: the run config's ``task`` picks segmentation or
classification. ``make_client_app(task=...)`` pins a task for users who import the
ClientApp into their own Flower project.

Data comes from ``node_config``: in Flower's simulation runtime ``partition-id`` and
``num-partitions`` select a synthetic site; in deployment ``data-dir`` names the
site's own folder (see :mod:`flower_medimg.data`). ``state-dir`` names the folder
where the site keeps what must survive a restart (private parameters, the DP-SGD
accountant) and ``dp-max-epsilon`` its privacy budget.

Every train reply carries the same metric keys: ``num-examples`` (training
samples), ``train-loss-before`` (the received model's loss on the local training
data), ``train-loss-after``, ``local-steps``, ``nova-a`` (FedNova), ``unit-weight``
(a constant 1, for uniform averaging with ``weighted_by_key="unit-weight"``),
``train-time-s``, and ``dp-epsilon`` (the site's cumulative ε) when DP-SGD is on.
Evaluate replies carry ``num-examples``, ``unit-weight``, ``eval-loss``, the task's
metrics and ``eval-time-s``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from monai.data import DataLoader

from flower_medimg.config import resolve_config
from flower_medimg.data import site_datasets
from flower_medimg.lifecycle.statistics import statistics_reply
from flower_medimg.models import model_from_config

from .attacks import apply_attack, check_attack_kind, flip_labels
from .dp_sgd import DPSettings, privatize
from .dropouts import SimulatedDropoutError, dropped_out
from .methods import (
    ClientMethods,
    amp_norms,
    class_counts,
    combine_penalties,
    fedmax_penalty,
    proximal_mu,
    proximal_penalty,
    weighted_loss,
)
from .private_params import private_keys, split_state
from .site_mods import SVT_STATE, run_with_mods, site_mods
from .site_state import SiteState
from .tasks import get_task
from .training import make_optimizer, mean_loss, nova_a, train_local

__all__ = ["device", "make_client_app", "site_seed"]


def device() -> torch.device:
    """Return the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def site_seed(config: Mapping[str, Any], context: Context, server_round: int) -> int:
    """Return a seed that differs per site and round but repeats across runs."""
    site = int(context.node_config.get("partition-id", context.node_id % 100_000))
    return int(config["seed"]) * 1_000_003 + server_round * 1_009 + site


def _private_state_name(config: Mapping[str, Any]) -> str:
    """Name of this experiment's private parameters in the site state.

    It depends on everything that shapes the network, so another model's private
    values are never loaded into this one.
    """
    shape = {k: config[k] for k in sorted(config) if k.startswith("model.")}
    shape.update(task=config["task"], private=config["private-params"])
    shape["classes"] = config["data.num-classes"]
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    return f"private-params-{digest[:12]}"


class _SiteModel:
    """The site's personalised network: received shared part + own private part."""

    def __init__(self, config: Mapping[str, Any], state: SiteState) -> None:
        self.config = config
        self.state = state
        self.model = model_from_config(config)
        self.private = private_keys(self.model, config["private-params"])
        self.state_name = _private_state_name(config)

    def load(self, shared: ArrayRecord) -> None:
        """Load the received shared arrays and this site's stored private values."""
        received = shared.to_torch_state_dict()
        expected = set(self.model.state_dict()) - set(self.private)
        if set(received) != expected:
            missing = sorted(expected - set(received))[:5]
            extra = sorted(set(received) - expected)[:5]
            raise ValueError(
                "The received global arrays do not match this site's shared "
                f"parameters (private-params={self.config['private-params']!r}): "
                f"missing {missing}, unexpected {extra}"
            )
        own = self.state.load_tensors(self.state_name) if self.private else None
        self.model.load_state_dict({**received, **(own or {})}, strict=own is not None)

    def shared_and_store_private(self) -> ArrayRecord:
        """Store the private values; return the shared arrays to send."""
        shared, own = split_state(self.model.state_dict(), self.private)
        if own:
            self.state.save_tensors(self.state_name, own)
        return ArrayRecord(shared)


def _loaders(
    config: Mapping[str, Any], context: Context, seed: int
) -> tuple[DataLoader, DataLoader, DataLoader, int]:
    """Shuffled train loader, ordered train loader, validation loader, train size."""
    train_ds, val_ds = site_datasets(config["task"], context.node_config, config)
    batch_size = int(config["train.batch-size"])
    generator = torch.Generator().manual_seed(seed)
    shuffled = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        # BatchNorm cannot train on a last batch of one image
        drop_last=len(train_ds) % batch_size == 1,
    )
    ordered = DataLoader(train_ds, batch_size=batch_size)
    validation = DataLoader(val_ds, batch_size=batch_size)
    return shuffled, ordered, validation, len(train_ds)


def _attack(config: Mapping[str, Any], context: Context) -> str | None:
    """Return the attack this simulated site runs, if ``attack.sites`` names it."""
    kind = (
        check_attack_kind(config["attack.kind"])
        if config["attack.kind"] != "none"
        else None
    )
    sites = {int(s) for s in str(config["attack.sites"]).split(",") if s.strip()}
    partition = context.node_config.get("partition-id")
    if kind is None or partition is None or int(partition) not in sites:
        return None
    return kind


def _flipped(batches: Iterable[dict], num_classes: int | None) -> Iterator[dict]:
    for batch in batches:
        yield {**batch, "label": flip_labels(batch["label"], num_classes)}


def _train(msg: Message, context: Context, config: dict[str, Any]) -> Message:
    started = time.perf_counter()
    train_config = msg.content.get("config", {})
    server_round = int(train_config.get("server-round", 0))
    if dropped_out(config, context, server_round):
        raise SimulatedDropoutError(f"simulated dropout in round {server_round}")
    seed = site_seed(config, context, server_round)
    torch.manual_seed(seed)
    task = get_task(config["task"])
    dev = device()
    state = SiteState(context)
    attack = _attack(config, context)
    dp = DPSettings.from_config(config)
    methods = ClientMethods.from_config(config)
    mu = proximal_mu(train_config)
    if mu > 0 and dp is not None:
        raise ValueError(
            "FedProx (proximal-mu > 0) cannot run with DP-SGD: Opacus replaces the "
            "gradient with the clipped per-sample one, dropping the proximal term"
        )

    site_model = _SiteModel(config, state)
    site_model.load(msg.content["arrays"])
    model = site_model.model.to(dev)
    for amp_norm in amp_norms(model):  # HarmoFL: shared amplitude fixed after round 1
        amp_norm.fixed = bool(train_config.get("fix-amp", server_round > 1))
    penalty = combine_penalties(
        proximal_penalty(model, site_model.private, mu),
        fedmax_penalty(model, methods.fedmax_beta) if methods.fedmax else None,
    )
    shuffled, ordered, _, num_examples = _loaders(config, context, seed)
    loss_fn = task.loss_fn()
    loss_before = mean_loss(model, ordered, loss_fn, dev)
    train_loss = loss_fn
    if methods.class_weights:
        counts = _class_counts(config, ordered.dataset)
        train_loss = weighted_loss(config["task"], counts).to(dev)

    momentum = float(config["train.momentum"])
    optimizer = make_optimizer(
        model,
        config["train.optimizer"],
        lr=float(train_config.get("lr", config["train.lr"])),
        momentum=momentum,
    )
    epochs = int(train_config.get("local-epochs", config["train.local-epochs"]))
    private_training = None
    if dp is not None:
        budget = context.node_config.get("dp-max-epsilon")
        model.train()  # Opacus validates a network in training mode
        private_training = privatize(
            model,
            optimizer,
            shuffled,
            dp,
            state,
            epochs=epochs,
            num_rounds=int(config["num-server-rounds"]),
            max_epsilon=float(budget) if budget is not None else None,
        )
        train_model, optimizer = private_training.model, private_training.optimizer
        shuffled = private_training.loader
    else:
        train_model = model
    batches: Iterable[dict] = shuffled
    if attack == "label-flip":
        num_classes = (
            int(config["data.num-classes"])
            if config["task"] == "classification"
            else None
        )
        batches = _ReIterable(lambda: _flipped(shuffled, num_classes))
    result = train_local(
        train_model,
        batches,
        train_loss,
        optimizer,
        epochs,
        dev,
        penalty=penalty,
        perturbation=methods.perturbation,
    )
    loss_after = mean_loss(model, ordered, loss_fn, dev)

    sgd_momentum = momentum if config["train.optimizer"] == "sgd" else 0.0
    values = {
        "num-examples": num_examples,
        "train-loss-before": loss_before,
        "train-loss-after": loss_after,
        "local-steps": result.steps,
        "nova-a": nova_a(result.steps, sgd_momentum),
        "unit-weight": 1,
    }
    if private_training is not None:
        values["dp-epsilon"] = private_training.finish(
            state, dp.delta, empty_lots=result.empty_batches
        )
    model.cpu()
    arrays = site_model.shared_and_store_private()
    if attack is not None and attack != "label-flip":
        arrays = _attacked(attack, msg.content["arrays"], arrays, seed)
    values["train-time-s"] = time.perf_counter() - started
    return Message(
        RecordDict({"arrays": arrays, "metrics": MetricRecord(values)}), reply_to=msg
    )


def _class_counts(config: Mapping[str, Any], dataset) -> np.ndarray:
    """Local class counts: images per class, or mask voxels per class."""
    num_classes = (
        int(config["data.num-classes"]) if config["task"] == "classification" else 2
    )
    return class_counts((item["label"] for item in dataset), num_classes)


class _ReIterable:
    """Make a generator factory iterable more than once (one pass per epoch)."""

    def __init__(self, factory) -> None:
        self.factory = factory

    def __iter__(self) -> Iterator[dict]:
        return self.factory()


def _attacked(
    kind: str, received: ArrayRecord, trained: ArrayRecord, seed: int
) -> ArrayRecord:
    global_arrays = {k: v.numpy() for k, v in received.items()}
    local_arrays = {k: v.numpy() for k, v in trained.items()}
    sent = apply_attack(kind, global_arrays, local_arrays, np.random.default_rng(seed))
    return ArrayRecord(
        {k: Array(np.require(v, requirements="C")) for k, v in sent.items()}
    )


def _evaluate(msg: Message, context: Context, config: dict[str, Any]) -> Message:
    started = time.perf_counter()
    task = get_task(config["task"])
    dev = device()
    site_model = _SiteModel(config, SiteState(context))
    site_model.load(msg.content["arrays"])
    _, _, validation, _ = _loaders(config, context, seed=0)
    values = task.evaluate(site_model.model.to(dev), validation, dev)
    if "partition-id" in context.node_config:  # simulation: which site this is
        values["partition-id"] = int(context.node_config["partition-id"])
    metrics = MetricRecord(
        {
            "num-examples": len(validation.dataset),
            "unit-weight": 1,
            **values,
            "eval-time-s": time.perf_counter() - started,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_client_app(
    task: str | None = None, mods: list[Mod] | None = None, **overrides: Any
) -> ClientApp:
    """Create a ClientApp that trains and evaluates the configured MONAI model.

    Parameters
    ----------
    task : str, optional
        Pin the task (``"segmentation"`` or ``"classification"``); by default the
        run config's ``task`` decides.
    mods : list of Flower mods, optional
        Mods wrapped around both handlers (e.g. Flower's ``fixedclipping_mod`` or
        our sparse-sharing privacy mods), as in ``ClientApp(mods=...)``.
    **overrides
        Run-config keys given in code (dotted keys, passed as
        ``**{"model.name": "unet"}``); they take precedence over the run config.

    Returns
    -------
    ClientApp
        A Message-API ClientApp with ``@app.train``, ``@app.evaluate`` and
        ``@app.query`` (data statistics, see :mod:`flower_medimg.lifecycle`).
    """
    if task is not None:
        get_task(task)  # fail now on an unknown name
        overrides["task"] = task
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received global model on this site's training split."""
        config = resolve_config(context.run_config, overrides)
        state = SiteState(context)
        state.restore_metrics(SVT_STATE)
        reply = run_with_mods(
            site_mods(config),
            lambda m, c: _train(m, c, config),
            msg,
            context,
        )
        state.persist_metrics(SVT_STATE)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the personalised global model on this site's validation split."""
        return _evaluate(msg, context, resolve_config(context.run_config, overrides))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Summarise this site's images and labels (the statistics phase)."""
        config = resolve_config(context.run_config, overrides)
        return statistics_reply(msg, context, config)

    return app
