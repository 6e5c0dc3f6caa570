"""A ClientApp that runs a MONAI bundle: Flower messages to ``MonaiAlgo`` and back.

A MONAI bundle brings its own network, transforms, loss, optimizer,
``SupervisedTrainer`` and ``SupervisedEvaluator`` in MONAI's config syntax
(https://docs.monai.io/en/stable/mb_specification.html). MONAI's federated client
:class:`monai.fl.client.MonaiAlgo` runs them and exchanges weights as an
``ExchangeObject``; this module maps Flower's Message API onto it, so that every
strategy, the quality gate, the lifecycle and the privacy mods of this package
work with a bundle unchanged (``task = "bundle"`` in the run config, or
:func:`make_bundle_client_app`).

Where things come from:

* **The bundle**: ``node_config["bundle-root"]``, the site's own installed copy.
  A bundle's configs are executed (``"$"`` values are Python), so a deployed site
  runs only a bundle it points at itself; a simulated site (Flower's simulation
  runtime sets ``partition-id``) runs the run config's ``bundle.root``.
* **The data**: ``node_config["data-dir"]`` (a site folder with ``dataset.json``,
  see :mod:`flower_medimg.data`) is passed to the bundle as the override
  ``dataset_dir`` (MONAI's bundle property), and ``node_config["datalist"]``, when
  set, as ``datalist``. A simulated site writes its synthetic images once as such
  a folder under the temporary directory (segmentation sites), since a bundle
  reads files.

What a reply carries (:mod:`flower_medimg.core.protocol`):

* train: the *full* trained weights, always. With ``bundle.send-weight-diff`` the
  bundle's ``MonaiAlgo`` returns ``WeightType.WEIGHT_DIFF``; the site adds the
  received global weights back before replying, so the server never needs to know
  which kind a site sent (and a difference can never be averaged as a model).
  ``num-examples`` is the size of the bundle's training dataset, ``local-steps``
  MONAI's ``num_executed_iterations``, ``nova-a`` FedNova's scalar for the bundle's
  optimizer (SGD momentum read from it), ``unit-weight`` and ``train-time-s``;
  ``train-loss-before``/``-after`` (the bundle's own loss over its training data, in
  order) only when the train config requests them.
* evaluate: the bundle evaluator's metrics under the bundle's own names (e.g.
  ``val_mean_dice``), ``eval-loss`` (the bundle's training loss on the validation
  batches, measured in the evaluator's own forward pass), ``num-examples`` (the
  validation dataset's size), ``unit-weight`` and ``eval-time-s``.
* query (statistics): :func:`~flower_medimg.client_apps.statistics.summarise_site`
  of the bundle's training and validation data lists through the bundle's own
  validation preprocessing. MONAI's ``MonaiAlgoStats`` summaries are per-case
  statistics that cannot be pooled exactly (no voxel sums, no counts outside the
  histogram range), so the bundle's data is summarised the way every other site's
  is.

Also with bundles: private parameters (``private-params``; the site stores its own
values and merges them into every received model), FedProx (the proximal term is
added to the bundle's loss), the privacy filters and user-level DP mods, simulated
dropouts and cross-site evaluation. Refused with a reason at the start of the run
(:mod:`flower_medimg.core.settings`): sample-level DP-SGD, the client methods and
the simulated attacks, all of which replace the optimizer, loss or loader the
bundle's trainer builds. The train config's ``lr`` is not applied: the bundle's
optimizer sets the learning rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.logger import log

from flower_medimg.core import protocol
from flower_medimg.core.bundle import BundleError, check_global_arrays
from flower_medimg.core.private_params import private_keys
from flower_medimg.core.settings import BUNDLE_TASK, Settings, SettingsError
from flower_medimg.data import (
    DATALIST_NAME,
    synthetic_settings,
    synthetic_site,
    write_site_folder,
)

from .app import make_client_app, site_name, site_seed
from .dropouts import SimulatedDropoutError, dropped_out
from .methods import proximal_mu, proximal_penalty
from .site_state import SiteState
from .statistics import _declines, summarise_site
from .training import nova_a

__all__ = [
    "bundle_evaluate",
    "bundle_query",
    "bundle_root",
    "bundle_train",
    "make_bundle_client_app",
    "site_data_dir",
]

#: Task of the synthetic site folders that simulated bundle sites read.
_SIMULATED_TASK = "segmentation"


def bundle_root(settings: Settings, context: Context) -> Path:
    """Return the folder of the bundle this site runs.

    Raises
    ------
    BundleError
        At a deployed site without ``node_config["bundle-root"]``.
    """
    node = context.node_config
    if protocol.NODE_BUNDLE_ROOT in node:
        return Path(str(node[protocol.NODE_BUNDLE_ROOT])).expanduser()
    if protocol.NODE_PARTITION_ID in node:
        return Path(settings["bundle.root"]).expanduser()
    raise BundleError(
        f"node_config has no '{protocol.NODE_BUNDLE_ROOT}': a deployed site runs "
        "only a MONAI bundle it installed itself (a bundle's configs run as code); "
        f"start the SuperNode with --node-config '{protocol.NODE_BUNDLE_ROOT}="
        '"/path/to/bundle"\''
    )


def _simulated_site_folder(settings: Settings, partition: int, num: int) -> Path:
    """Write a simulated site's synthetic images once as a site folder."""
    kwargs = synthetic_settings(settings)
    key = json.dumps({**kwargs, "num-partitions": num}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    parent = Path(tempfile.gettempdir()) / "flower-medimg-sites" / digest
    folder = parent / f"site-{partition}"
    if (folder / DATALIST_NAME).is_file():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".site-{partition}-", dir=parent))
    site = synthetic_site(_SIMULATED_TASK, partition, num, **kwargs)
    write_site_folder(site, staging, _SIMULATED_TASK)
    try:
        staging.rename(folder)  # atomic: a concurrent writer's folder is as good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def site_data_dir(settings: Settings, context: Context) -> Path:
    """Return the site folder the bundle reads (``dataset_dir``).

    Raises
    ------
    ValueError
        If ``node_config`` has neither ``data-dir`` nor ``partition-id`` and
        ``num-partitions``.
    """
    node = context.node_config
    if protocol.NODE_DATA_DIR in node:
        return Path(str(node[protocol.NODE_DATA_DIR])).expanduser().resolve()
    if protocol.NODE_PARTITION_ID in node and protocol.NODE_NUM_PARTITIONS in node:
        return _simulated_site_folder(
            settings,
            int(node[protocol.NODE_PARTITION_ID]),
            int(node[protocol.NODE_NUM_PARTITIONS]),
        )
    raise ValueError(
        "node_config must name the site's data: 'data-dir' (a site folder) or "
        f"'partition-id' and 'num-partitions' (simulation); got {sorted(node)}"
    )


def _overrides(settings: Settings, context: Context) -> dict[str, str]:
    """Return the bundle config ids the site sets: its data folder (and datalist)."""
    data_dir = site_data_dir(settings, context)
    overrides = {"dataset_dir": str(data_dir)}
    datalist = context.node_config.get(protocol.NODE_DATALIST)
    if datalist is not None:
        overrides["datalist"] = str(data_dir / str(datalist))
    return overrides


def _algo(settings: Settings, context: Context, local_epochs: int = 1) -> Any:
    """Build and initialise MONAI's ``MonaiAlgo`` for this site's bundle and data."""
    from monai.fl.client import MonaiAlgo  # MONAI's engines (ignite) for bundles only
    from monai.fl.utils.constants import ExtraItems

    root = bundle_root(settings, context)
    train_config = settings["bundle.train-config"]
    evaluate_config = settings["bundle.evaluate-config"]
    evaluate_files = [train_config]
    if evaluate_config and (root / evaluate_config).is_file():
        evaluate_files.append(evaluate_config)
    overrides = _overrides(settings, context)
    algo = MonaiAlgo(
        str(root),
        local_epochs=local_epochs,
        send_weight_diff=settings["bundle.send-weight-diff"],
        config_train_filename=train_config,
        train_kwargs=dict(overrides),
        config_evaluate_filename=evaluate_files,
        eval_kwargs=dict(overrides),
    )
    algo.initialize({ExtraItems.CLIENT_NAME: site_name(context)})
    return algo


class _SiteWeights:
    """The bundle network's private keys, stored per site, merged into received arrays.

    Parameters
    ----------
    settings : Settings
        The run's settings (``private-params``).
    context : Context
        The ClientApp's context (site state).
    network : torch.nn.Module
        The bundle's network at this site.
    """

    def __init__(
        self, settings: Settings, context: Context, network: torch.nn.Module
    ) -> None:
        self.network = network
        rule = settings["private-params"]
        self.private = private_keys(network, rule)
        self.state = SiteState(context)
        layout = [(k, list(v.shape)) for k, v in network.state_dict().items()]
        digest = hashlib.sha256(json.dumps([rule, layout]).encode()).hexdigest()
        self.state_name = f"bundle-private-params-{digest[:12]}"

    def merged(self, received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check ``received`` against the network; add this site's private values."""
        check_global_arrays(received, self.network, self.private)
        own = self.state.load_tensors(self.state_name) if self.private else None
        return {**received, **(own or {})}

    def shared_and_store_private(
        self, trained: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Store the trained private values; return the shared weights to send."""
        if self.private:
            state = self.network.state_dict()
            self.state.save_tensors(
                self.state_name, {k: state[k] for k in self.private}
            )
        return {k: v for k, v in trained.items() if k not in self.private}


def _full_weights(
    exchanged: Any, sent: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return full weights from ``MonaiAlgo.get_weights``: differences added back."""
    from monai.fl.utils.constants import WeightType

    weights = dict(exchanged.weights or {})
    if exchanged.weight_type == WeightType.WEIGHT_DIFF:
        return {k: (sent[k] + v.to(sent[k].dtype)).cpu() for k, v in weights.items()}
    if exchanged.weight_type == WeightType.WEIGHTS:
        return {k: v.cpu() for k, v in weights.items()}
    raise BundleError(f"MonaiAlgo returned no weights ({exchanged.weight_type!r})")


def _sgd_momentum(optimizer: torch.optim.Optimizer) -> float:
    """SGD's momentum (FedNova's ``a``); other optimizers count steps."""
    if isinstance(optimizer, torch.optim.SGD):
        return float(optimizer.param_groups[0].get("momentum", 0.0))
    return 0.0


@torch.no_grad()
def _mean_train_loss(trainer: Any) -> float:
    """Return the bundle's loss of its network over the training data, in order."""
    from monai.data import DataLoader

    loader = trainer.data_loader
    ordered = DataLoader(
        loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn
    )
    network = trainer.network
    network.eval()
    total = count = 0.0
    for batch in ordered:
        prepared = trainer.prepare_batch(
            batch, trainer.state.device, trainer.non_blocking, **trainer.to_kwargs
        )
        # as SupervisedTrainer: (inputs, targets) or (inputs, targets, args, kwargs)
        inputs, targets, args, kwargs = (*prepared, (), {})[:4]
        pred = trainer.inferer(inputs, network, *args, **kwargs)
        total += float(trainer.loss_function(pred, targets).mean()) * len(inputs)
        count += len(inputs)
    network.train()
    return total / count


class _LossMeter:
    """Mean of a loss over an evaluator's batches, read after each forward pass."""

    def __init__(self, loss_function: Callable) -> None:
        self.loss_function = loss_function
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def __call__(self, engine: Any) -> None:
        from monai.utils import CommonKeys

        output = engine.state.output
        size = len(output[CommonKeys.IMAGE])
        loss = self.loss_function(output[CommonKeys.PRED], output[CommonKeys.LABEL])
        self.total += float(loss.mean()) * size
        self.count += size

    @property
    def mean(self) -> float:
        """The mean loss per image."""
        return self.total / self.count if self.count else math.nan


def _with_proximal_term(trainer: Any, penalty: Callable[[], torch.Tensor]) -> None:
    """Add FedProx's proximal term to the bundle trainer's loss."""
    loss_function = trainer.loss_function

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_function(pred, target).mean() + penalty().to(pred.device)

    trainer.loss_function = loss


def bundle_train(msg: Message, context: Context, settings: Settings) -> Message:
    """Train the received global model with the site's bundle (``MonaiAlgo.train``)."""
    from monai.fl.utils.exchange_object import ExchangeObject
    from monai.networks.utils import copy_model_state

    started = time.perf_counter()
    name = site_name(context)
    train_config = msg.content.get(protocol.RECORD_CONFIG, {})
    server_round = int(train_config.get(protocol.CONFIG_SERVER_ROUND, 0))
    if dropped_out(settings, context, server_round):
        raise SimulatedDropoutError(f"simulated dropout in round {server_round}")
    requested = protocol.requested_metrics(train_config)
    epochs = int(
        train_config.get(protocol.CONFIG_LOCAL_EPOCHS, settings["train.local-epochs"])
    )
    mu = proximal_mu(train_config)
    torch.manual_seed(site_seed(settings, context, server_round))
    algo = _algo(settings, context, local_epochs=epochs)
    trainer = algo.trainer
    site = _SiteWeights(settings, context, trainer.network)
    received = msg.content[protocol.RECORD_ARRAYS].to_torch_state_dict()
    weights = site.merged(received)
    copy_model_state(weights, trainer.network)
    values: dict[str, Any] = {}
    if protocol.METRIC_TRAIN_LOSS_BEFORE in requested:
        values[protocol.METRIC_TRAIN_LOSS_BEFORE] = _mean_train_loss(trainer)
    penalty = proximal_penalty(trainer.network, site.private, mu)
    if penalty is not None:
        _with_proximal_term(trainer, penalty)
    trained = time.perf_counter()
    algo.train(ExchangeObject(weights=weights))
    exchanged = algo.get_weights()
    steps = int(exchanged.statistics["num_executed_iterations"])
    log(
        INFO,
        "%s: train: round %d, bundle %s, %d local steps, %s returned (%.2f s)",
        name,
        server_round,
        algo.bundle_root,
        steps,
        exchanged.weight_type,
        time.perf_counter() - trained,
    )
    shared = site.shared_and_store_private(_full_weights(exchanged, weights))
    if protocol.METRIC_TRAIN_LOSS_AFTER in requested:
        values[protocol.METRIC_TRAIN_LOSS_AFTER] = _mean_train_loss(trainer)
    values.update(
        {
            protocol.METRIC_NUM_EXAMPLES: len(trainer.data_loader.dataset),
            protocol.METRIC_LOCAL_STEPS: steps,
            protocol.METRIC_NOVA_A: nova_a(steps, _sgd_momentum(trainer.optimizer)),
            protocol.METRIC_UNIT_WEIGHT: 1,
        }
    )
    algo.finalize()
    values[protocol.METRIC_TRAIN_TIME] = time.perf_counter() - started
    log(INFO, "%s: reply: train metrics %s", name, sorted(values))
    return Message(
        RecordDict(
            {
                protocol.RECORD_ARRAYS: ArrayRecord(shared),
                protocol.RECORD_METRICS: MetricRecord(values),
            }
        ),
        reply_to=msg,
    )


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Return the evaluator's scalar, finite metrics (replies carry numbers only)."""
    found = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and math.isfinite(value):
            found[str(key)] = float(value)
    return found


def bundle_evaluate(msg: Message, context: Context, settings: Settings) -> Message:
    """Evaluate the received model with the bundle's evaluator (``MonaiAlgo``)."""
    from monai.engines import IterationEvents
    from monai.fl.utils.exchange_object import ExchangeObject

    started = time.perf_counter()
    algo = _algo(settings, context)
    evaluator = algo.evaluator
    site = _SiteWeights(settings, context, evaluator.network)
    received = msg.content[protocol.RECORD_ARRAYS].to_torch_state_dict()
    meter = _LossMeter(algo.trainer.loss_function)
    evaluator.add_event_handler(IterationEvents.FORWARD_COMPLETED, meter)
    exchanged = algo.evaluate(ExchangeObject(weights=site.merged(received)))
    values = _finite_metrics(exchanged.metrics or {})
    values[protocol.METRIC_EVAL_LOSS] = meter.mean
    partition = context.node_config.get(protocol.NODE_PARTITION_ID)
    if partition is not None:  # simulation: which site this is
        values[protocol.METRIC_PARTITION_ID] = int(partition)
    algo.finalize()
    log(
        INFO,
        "%s: evaluate: %s (%.2f s)",
        site_name(context),
        ", ".join(f"{k} {v:.4f}" for k, v in values.items()),
        time.perf_counter() - started,
    )
    metrics = MetricRecord(
        {
            **values,
            protocol.METRIC_NUM_EXAMPLES: len(evaluator.data_loader.dataset),
            protocol.METRIC_UNIT_WEIGHT: 1,
            protocol.METRIC_EVAL_TIME: time.perf_counter() - started,
        }
    )
    return Message(RecordDict({protocol.RECORD_METRICS: metrics}), reply_to=msg)


def bundle_query(msg: Message, context: Context, settings: Settings) -> Message:
    """Summarise the bundle's data at this site (the statistics phase)."""
    from monai.bundle import ConfigWorkflow
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    if _declines(context.node_config):
        return Message(
            Error(
                code=protocol.ERROR_REFUSED,
                reason="the site declines to share data statistics",
            ),
            reply_to=msg,
        )
    root = bundle_root(settings, context)
    workflow = ConfigWorkflow(
        config_file=str(root / settings["bundle.train-config"]),
        logging_file=False,
        workflow_type="train",
        **_overrides(settings, context),
    )
    workflow.initialize()
    items = [*workflow.train_dataset_data, *(workflow.val_dataset_data or [])]
    keys = ["image", "label"]
    preprocessing = workflow.val_preprocessing or Compose(
        [LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)]
    )
    query = msg.content[protocol.RECORD_CONFIG]
    values = summarise_site(
        (preprocessing(dict(item)) for item in items),
        int(query[protocol.QUERY_BINS]),
        (
            float(query[protocol.QUERY_RANGE_MIN]),
            float(query[protocol.QUERY_RANGE_MAX]),
        ),
        settings.num_classes,
    )
    partition = context.node_config.get(protocol.NODE_PARTITION_ID)
    if partition is not None:
        values[protocol.METRIC_PARTITION_ID] = int(partition)
    return Message(
        RecordDict({protocol.RECORD_STATISTICS: MetricRecord(values)}), reply_to=msg
    )


def make_bundle_client_app(
    mods: list[Mod] | None = None, **overrides: Any
) -> ClientApp:
    """Create a ClientApp that trains and evaluates a MONAI bundle at each site.

    The same as ``make_client_app(task="bundle", ...)``: Flower's train, evaluate
    and query messages go to :func:`bundle_train`, :func:`bundle_evaluate` and
    :func:`bundle_query`, inside the mods the run config asks for.

    Parameters
    ----------
    mods : list of Flower mods, optional
        Mods wrapped around the handlers, as in ``ClientApp(mods=...)``.
    **overrides
        Run-config keys given in code (e.g. ``**{"bundle.root": "my-bundle"}``).

    Raises
    ------
    SettingsError
        If an override is not a valid setting, or sets another ``task``.
    """
    task = overrides.pop("task", BUNDLE_TASK)
    if task != BUNDLE_TASK:
        raise SettingsError(
            f"make_bundle_client_app got task = {task!r}: a bundle ClientApp runs "
            f"task = {BUNDLE_TASK!r}; use make_client_app for the built-in tasks"
        )
    return make_client_app(task=BUNDLE_TASK, mods=mods, **overrides)
