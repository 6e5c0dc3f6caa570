"""ClientApps that train and evaluate MONAI models at a site.

One ClientApp serves both tasks: the run config's ``task`` picks segmentation or
classification. ``make_client_app(task=...)`` pins a task for users who import the
ClientApp into their own Flower project.

Data comes from ``node_config``: in Flower's simulation runtime ``partition-id`` and
``num-partitions`` select a synthetic site; in deployment ``data-dir`` names the
site's own folder (see :mod:`flower_medimg.data`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from monai.data import DataLoader

from flower_medimg.config import resolve_config
from flower_medimg.data import site_datasets
from flower_medimg.models import model_from_config

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


def _loaders(
    config: Mapping[str, Any], context: Context, seed: int
) -> tuple[DataLoader, DataLoader, DataLoader, int]:
    """Shuffled train loader, ordered train loader, validation loader, train size."""
    train_ds, val_ds = site_datasets(config["task"], context.node_config, config)
    batch_size = int(config["train.batch-size"])
    generator = torch.Generator().manual_seed(seed)
    shuffled = DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, generator=generator
    )
    ordered = DataLoader(train_ds, batch_size=batch_size)
    validation = DataLoader(val_ds, batch_size=batch_size)
    return shuffled, ordered, validation, len(train_ds)


def _train(msg: Message, context: Context, config: dict[str, Any]) -> Message:
    started = time.perf_counter()
    train_config = msg.content.get("config", {})
    server_round = int(train_config.get("server-round", 0))
    seed = site_seed(config, context, server_round)
    torch.manual_seed(seed)
    task = get_task(config["task"])
    dev = device()

    model = model_from_config(config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(dev)
    shuffled, ordered, _, num_examples = _loaders(config, context, seed)
    loss_fn = task.loss_fn()

    loss_before = mean_loss(model, ordered, loss_fn, dev)
    momentum = float(config["train.momentum"])
    optimizer = make_optimizer(
        model,
        config["train.optimizer"],
        lr=float(train_config.get("lr", config["train.lr"])),
        momentum=momentum,
    )
    epochs = int(train_config.get("local-epochs", config["train.local-epochs"]))
    result = train_local(model, shuffled, loss_fn, optimizer, epochs, dev)
    loss_after = mean_loss(model, ordered, loss_fn, dev)

    sgd_momentum = momentum if config["train.optimizer"] == "sgd" else 0.0
    metrics = MetricRecord(
        {
            "num-examples": num_examples,
            "train-loss-before": loss_before,
            "train-loss-after": loss_after,
            "local-steps": result.steps,
            "nova-a": nova_a(result.steps, sgd_momentum),
            "train-time-s": time.perf_counter() - started,
        }
    )
    arrays = ArrayRecord(model.cpu().state_dict())
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _evaluate(msg: Message, context: Context, config: dict[str, Any]) -> Message:
    started = time.perf_counter()
    task = get_task(config["task"])
    dev = device()
    model = model_from_config(config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(dev)
    _, _, validation, _ = _loaders(config, context, seed=0)
    values = task.evaluate(model, validation, dev)
    metrics = MetricRecord(
        {
            "num-examples": len(validation.dataset),
            **values,
            "eval-time-s": time.perf_counter() - started,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_client_app(task: str | None = None, **overrides: Any) -> ClientApp:
    """Create a ClientApp that trains and evaluates the configured MONAI model.

    Parameters
    ----------
    task : str, optional
        Pin the task (``"segmentation"`` or ``"classification"``); by default the
        run config's ``task`` decides.
    **overrides
        Run-config keys given in code (dotted keys, e.g. ``{"model.name": "unet"}``
        as ``**{"model.name": "unet"}``); they take precedence over the run config.

    Returns
    -------
    ClientApp
        A Message-API ClientApp with ``@app.train`` and ``@app.evaluate``.
    """
    if task is not None:
        get_task(task)  # fail now on an unknown name
        overrides["task"] = task
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received global model on this site's training split."""
        return _train(msg, context, resolve_config(context.run_config, overrides))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the received global model on this site's validation split."""
        return _evaluate(msg, context, resolve_config(context.run_config, overrides))

    return app
