"""ClientApps that train and evaluate MONAI models at a site.

One ClientApp serves both tasks: the run config's ``task`` picks segmentation or
classification. ``make_client_app(task=...)`` pins a task for users who import the
ClientApp into their own Flower project.

Data comes from ``node_config``: in Flower's simulation runtime ``partition-id`` and
``num-partitions`` select a synthetic site; in deployment ``data-dir`` names the
site's own folder (see :mod:`flower_medimg.data`). ``state-dir`` names the folder
where the site keeps what must survive a restart (private parameters, the DP-SGD
accountant), ``dp-max-epsilon`` its privacy budget and ``site-name`` how its log
lines name it.

The reply metrics are those of :mod:`flower_medimg.core.protocol`: every train
reply carries ``num-examples`` (training samples), ``local-steps``, ``nova-a``
(FedNova), ``unit-weight`` (a constant 1, for uniform averaging), ``train-time-s``
and, with DP-SGD, ``dp-epsilon`` (the site's cumulative ε); ``train-loss-before``
(the received model's loss on the local training data) and ``train-loss-after``
cost two extra passes over the data and are sent only when the train config asks
for them (``request-metrics``). Evaluate replies carry ``num-examples``,
``unit-weight``, ``eval-loss``, the task's metrics and ``eval-time-s``.

Each phase (data, train, evaluate, reply) is logged with the site's name, as
MONAI's ``MonaiAlgo`` does.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.logger import log
from monai.data import DataLoader

from flower_medimg.core import protocol
from flower_medimg.core.amp_norm import amp_norms
from flower_medimg.core.device import device
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.private_params import private_keys, split_state
from flower_medimg.core.settings import (
    BUNDLE_TASK,
    Settings,
    check_values,
    resolve_settings,
)
from flower_medimg.core.startup import startup_seconds
from flower_medimg.core.tasks import get_task
from flower_medimg.data import site_datasets

from .attacks import (
    ARRAY_ATTACKS,
    PROCESS_ATTACKS,
    REPLY_ATTACKS,
    apply_attack,
    attack_mod,
    attacking,
    flip_labels,
)
from .dropouts import SimulatedDropoutError, dropped_out
from .methods import (
    ClientMethods,
    class_counts,
    combine_penalties,
    fedmax_penalty,
    proximal_mu,
    proximal_penalty,
    weighted_loss,
)
from .site_mods import SVT_STATE, model_mods, run_with_mods, site_mods
from .site_state import SiteState
from .statistics import statistics_reply
from .training import (
    drops_last_batch,
    make_optimizer,
    mean_loss,
    nova_a,
    train_local,
)
from .watchdog import deadline_mod

__all__ = ["make_client_app", "site_name", "site_seed"]


def site_name(context: Context) -> str:
    """Return how log lines name this site.

    ``node_config["site-name"]`` when the site set one, ``site-<k>`` for a
    simulated partition, else the node id.
    """
    node = context.node_config
    if protocol.NODE_SITE_NAME in node:
        return str(node[protocol.NODE_SITE_NAME])
    if protocol.NODE_PARTITION_ID in node:
        return f"site-{node[protocol.NODE_PARTITION_ID]}"
    return f"node-{context.node_id}"


def site_seed(settings: Settings, context: Context, server_round: int) -> int:
    """Return a seed that differs per site and round but repeats across runs."""
    site = int(
        context.node_config.get(protocol.NODE_PARTITION_ID, context.node_id % 100_000)
    )
    return settings["seed"] * 1_000_003 + server_round * 1_009 + site


def _private_state_name(settings: Settings) -> str:
    """Name of this experiment's private parameters in the site state.

    It depends on everything that shapes the network, so another model's private
    values are never loaded into this one.
    """
    shape = {k: settings[k] for k in sorted(settings) if k.startswith("model.")}
    shape.update(task=settings["task"], private=settings["private-params"])
    shape["classes"] = settings["data.num-classes"]
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    return f"private-params-{digest[:12]}"


class _SiteModel:
    """The site's personalised network: received shared part + own private part."""

    def __init__(self, settings: Settings, state: SiteState) -> None:
        self.settings = settings
        self.state = state
        self.model = model_from_settings(settings)
        self.private = private_keys(self.model, settings["private-params"])
        self.state_name = _private_state_name(settings)

    def load(self, shared: ArrayRecord) -> None:
        """Load the received shared arrays and this site's stored private values."""
        received = shared.to_torch_state_dict()
        expected = set(self.model.state_dict()) - set(self.private)
        if set(received) != expected:
            missing = sorted(expected - set(received))[:5]
            extra = sorted(set(received) - expected)[:5]
            raise ValueError(
                "The received global arrays do not match this site's shared "
                f"parameters (private-params={self.settings['private-params']!r}): "
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
    settings: Settings, context: Context, seed: int
) -> tuple[DataLoader, DataLoader, DataLoader, int]:
    """Shuffled train loader, ordered train loader, validation loader, train size."""
    started = time.perf_counter()
    train_ds, val_ds = site_datasets(settings, context.node_config)
    batch_size = settings["train.batch-size"]
    generator = torch.Generator().manual_seed(seed)
    shuffled = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=drops_last_batch(len(train_ds), batch_size),
    )
    ordered = DataLoader(train_ds, batch_size=batch_size)
    validation = DataLoader(val_ds, batch_size=batch_size)
    log(
        INFO,
        "%s: data: %d training and %d validation samples (%.2f s)",
        site_name(context),
        len(train_ds),
        len(val_ds),
        time.perf_counter() - started,
    )
    return shuffled, ordered, validation, len(train_ds)


def _flipped(batches: Iterable[dict], num_classes: int | None) -> Iterator[dict]:
    for batch in batches:
        yield {**batch, "label": flip_labels(batch["label"], num_classes)}


def _train(msg: Message, context: Context, settings: Settings) -> Message:
    started = time.perf_counter()
    name = site_name(context)
    train_config = msg.content.get(protocol.RECORD_CONFIG, {})
    server_round = int(train_config.get(protocol.CONFIG_SERVER_ROUND, 0))
    if dropped_out(settings, context, server_round):
        raise SimulatedDropoutError(f"simulated dropout in round {server_round}")
    requested = protocol.requested_metrics(train_config)
    seed = site_seed(settings, context, server_round)
    torch.manual_seed(seed)
    task = get_task(settings["task"])
    dev = device()
    state = SiteState(context)
    attack = attacking(settings, context)
    methods = ClientMethods.from_settings(settings)
    mu = proximal_mu(train_config)
    if mu > 0 and settings.dp_sgd:
        raise ValueError(
            "FedProx (proximal-mu > 0) cannot run with DP-SGD: Opacus replaces the "
            "gradient with the clipped per-sample one, dropping the proximal term"
        )

    site_model = _SiteModel(settings, state)
    site_model.load(msg.content[protocol.RECORD_ARRAYS])
    model = site_model.model.to(dev)
    for amp_norm in amp_norms(model):  # HarmoFL: shared amplitude fixed after round 1
        amp_norm.fixed = bool(
            train_config.get(protocol.CONFIG_FIX_AMP, server_round > 1)
        )
    penalty = combine_penalties(
        proximal_penalty(model, site_model.private, mu),
        fedmax_penalty(model, methods.fedmax_beta) if methods.fedmax else None,
    )
    shuffled, ordered, _, num_examples = _loaders(settings, context, seed)
    loss_fn = task.loss_fn()
    values: dict[str, Any] = _startup(context)
    if protocol.METRIC_TRAIN_LOSS_BEFORE in requested:
        values[protocol.METRIC_TRAIN_LOSS_BEFORE] = mean_loss(
            model, ordered, loss_fn, dev
        )
    train_loss = loss_fn
    if methods.class_weights:
        counts = class_counts(
            (item["label"] for item in ordered.dataset), settings.num_classes
        )
        train_loss = weighted_loss(settings["task"], counts).to(dev)

    momentum = settings["train.momentum"]
    optimizer = make_optimizer(
        model,
        settings["train.optimizer"],
        lr=float(train_config.get(protocol.CONFIG_LR, settings["train.lr"])),
        momentum=momentum,
    )
    epochs = int(
        train_config.get(protocol.CONFIG_LOCAL_EPOCHS, settings["train.local-epochs"])
    )
    private_training = None
    train_model = model
    if settings.dp_sgd:
        from .dp_sgd import DPSettings, privatize  # Opacus only when DP-SGD is on

        dp = DPSettings.from_settings(settings)
        assert dp is not None
        budget = context.node_config.get(protocol.NODE_DP_MAX_EPSILON)
        model.train()  # Opacus validates a network in training mode
        private_training = privatize(
            model,
            optimizer,
            shuffled,
            dp,
            state,
            epochs=epochs,
            num_rounds=settings["num-server-rounds"],
            max_epsilon=float(budget) if budget is not None else None,
        )
        train_model, optimizer = private_training.model, private_training.optimizer
        shuffled = private_training.loader
    batches: Iterable[dict] = shuffled
    if attack == "label-flip":
        num_classes = (
            settings.num_classes if settings["task"] == "classification" else None
        )
        batches = _ReIterable(lambda: _flipped(shuffled, num_classes))
    trained = time.perf_counter()
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
    log(
        INFO,
        "%s: train: round %d, %d local steps, mean loss %.4f (%.2f s)",
        name,
        server_round,
        result.steps,
        result.mean_loss,
        time.perf_counter() - trained,
    )
    if protocol.METRIC_TRAIN_LOSS_AFTER in requested:
        values[protocol.METRIC_TRAIN_LOSS_AFTER] = mean_loss(
            model, ordered, loss_fn, dev
        )

    sgd_momentum = momentum if settings["train.optimizer"] == "sgd" else 0.0
    values.update(
        {
            protocol.METRIC_NUM_EXAMPLES: num_examples,
            protocol.METRIC_LOCAL_STEPS: result.steps,
            protocol.METRIC_NOVA_A: nova_a(result.steps, sgd_momentum),
            protocol.METRIC_UNIT_WEIGHT: 1,
        }
    )
    if private_training is not None:
        values[protocol.METRIC_DP_EPSILON] = private_training.finish(
            state, settings["dp.delta"], empty_lots=result.empty_batches
        )
    model.cpu()
    arrays = site_model.shared_and_store_private()
    if attack in ARRAY_ATTACKS:
        arrays = _attacked(attack, msg.content[protocol.RECORD_ARRAYS], arrays, seed)
    values[protocol.METRIC_TRAIN_TIME] = time.perf_counter() - started
    values.update(_peak_memory(context))
    log(INFO, "%s: reply: train metrics %s", name, sorted(values))
    return Message(
        RecordDict(
            {
                protocol.RECORD_ARRAYS: arrays,
                protocol.RECORD_METRICS: MetricRecord(values),
            }
        ),
        reply_to=msg,
    )


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


def _startup(context: Context) -> dict[str, float]:
    """``startup-s`` in deployment (see :mod:`flower_medimg.core.startup`)."""
    if protocol.NODE_PARTITION_ID in context.node_config:
        return {}  # simulation: the Ray actor started long before this message
    seconds = startup_seconds()
    return {} if seconds is None else {protocol.METRIC_STARTUP_TIME: seconds}


def _peak_memory(context: Context) -> dict[str, float]:
    """``peak-rss-mib`` in deployment: this message process's peak resident memory."""
    if protocol.NODE_PARTITION_ID in context.node_config:
        return {}  # simulation: one Ray actor serves many sites
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {protocol.METRIC_PEAK_MEMORY: peak_kib / 1024}


def _evaluate(msg: Message, context: Context, settings: Settings) -> Message:
    started = time.perf_counter()
    task = get_task(settings["task"])
    dev = device()
    site_model = _SiteModel(settings, SiteState(context))
    site_model.load(msg.content[protocol.RECORD_ARRAYS])
    _, _, validation, _ = _loaders(settings, context, seed=0)
    startup = _startup(context)
    values = task.evaluate(site_model.model.to(dev), validation, dev)
    partition = context.node_config.get(protocol.NODE_PARTITION_ID)
    if partition is not None:  # simulation: which site this is
        values[protocol.METRIC_PARTITION_ID] = int(partition)
    metrics = MetricRecord(
        {
            protocol.METRIC_NUM_EXAMPLES: len(validation.dataset),
            protocol.METRIC_UNIT_WEIGHT: 1,
            **values,
            **startup,
            **_peak_memory(context),
            protocol.METRIC_EVAL_TIME: time.perf_counter() - started,
        }
    )
    log(
        INFO,
        "%s: evaluate: %s (%.2f s)",
        site_name(context),
        ", ".join(f"{k} {v:.4f}" for k, v in values.items()),
        time.perf_counter() - started,
    )
    return Message(RecordDict({protocol.RECORD_METRICS: metrics}), reply_to=msg)


def _guard_mods(settings: Settings, context: Context) -> list[Mod]:
    """Return the message deadline mod, and a simulated attack on replies if set."""
    mods = [deadline_mod(settings["round-timeout"], site_name(context))]
    attack = attacking(settings, context)
    if attack in REPLY_ATTACKS + PROCESS_ATTACKS:
        mods.append(attack_mod(attack))
    return mods


def _handler(settings: Settings, phase: str) -> Callable[..., Message]:
    """Return the ``train``, ``evaluate`` or ``query`` handler of the run's task."""
    if settings["task"] == BUNDLE_TASK:
        from . import bundle  # MONAI's bundle engines (ignite) only for bundles

        handlers = {
            "train": bundle.bundle_train,
            "evaluate": bundle.bundle_evaluate,
            "query": bundle.bundle_query,
        }
    else:
        handlers = {"train": _train, "evaluate": _evaluate, "query": statistics_reply}
    return handlers[phase]


def make_client_app(
    task: str | None = None, mods: list[Mod] | None = None, **overrides: Any
) -> ClientApp:
    """Create a ClientApp that trains and evaluates the configured MONAI model.

    Parameters
    ----------
    task : str, optional
        Pin the task (``"segmentation"``, ``"classification"`` or ``"bundle"``, a
        MONAI bundle's own trainer, see :mod:`.bundle`); by default the run
        config's ``task`` decides.
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

    Raises
    ------
    SettingsError
        If ``task`` or an override is not a valid setting.
    """
    if task is not None:
        overrides["task"] = task
    check_values(overrides)  # fail now on a bad override
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the received global model on this site's training split."""
        settings = resolve_settings(context.run_config, overrides)
        state = SiteState(context)
        state.restore_metrics(SVT_STATE)
        reply = run_with_mods(
            [*_guard_mods(settings, context), *site_mods(settings, context)],
            lambda m, c: _handler(settings, "train")(m, c, settings),
            msg,
            context,
        )
        state.persist_metrics(SVT_STATE)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the personalised global model on this site's validation split."""
        settings = resolve_settings(context.run_config, overrides)
        return run_with_mods(
            [*_guard_mods(settings, context), *model_mods(settings, context)],
            lambda m, c: _handler(settings, "evaluate")(m, c, settings),
            msg,
            context,
        )

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Summarise this site's images and labels (the statistics phase)."""
        settings = resolve_settings(context.run_config, overrides)
        return run_with_mods(
            _guard_mods(settings, context),
            lambda m, c: _handler(settings, "query")(m, c, settings),
            msg,
            context,
        )

    return app
