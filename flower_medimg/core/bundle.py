"""MONAI bundles: what the server and the sites both read from one.

A MONAI bundle (https://docs.monai.io/en/stable/mb_specification.html) is a folder
with ``configs/train.json`` (network, transforms, trainer, evaluator in MONAI's
config syntax), optional ``configs/evaluate.json`` and ``configs/inference.json``,
``configs/metadata.json`` and ``models/model.pt``. The sites run a bundle through
MONAI's own federated client, :class:`monai.fl.client.MonaiAlgo`, which executes
the configs (their ``"$..."`` values are Python). The server must not: whoever can
write the server's disk must not make the ServerApp run code. The server therefore
reads a bundle here, without executing it:

* :func:`network_from_bundle` builds the bundle's ``network_def`` from its literal
  arguments and ``@`` references only; every ``_target_`` must be a
  :class:`torch.nn.Module` class of ``monai.networks`` or ``torch.nn``, and a
  ``"$"`` expression is refused with a message naming it;
* :func:`bundle_weights` reads ``models/model.pt`` with ``torch.load(...,
  weights_only=True)`` (no unpickling of code);
* :func:`bundle_model` combines the two into the initial global model: the
  network, seeded by the run's ``seed``, with the shipped weights loaded strictly
  when the bundle has them, so that the global keys and shapes are the bundle's.

:func:`check_global_arrays` is the one check of received arrays against a
network (the same keys, the same shapes), used by the sites before MONAI's
``convert_global_weights``, which silently reshapes any tensor with the right
number of elements.
"""

from __future__ import annotations

import pydoc
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.bundle import (
    ComponentLocator,
    ConfigComponent,
    ConfigExpression,
    ConfigParser,
)

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "BundleError",
    "NETWORK_ID",
    "WEIGHTS_PATH",
    "bundle_model",
    "bundle_weights",
    "check_global_arrays",
    "network_from_bundle",
    "read_bundle_config",
]

#: The bundle property holding the network (MONAI's ``TrainProperties``).
NETWORK_ID = "network_def"
#: Where a bundle keeps its weights, relative to its root.
WEIGHTS_PATH = "models/model.pt"
#: Packages whose ``torch.nn.Module`` classes a server-side ``network_def`` may name.
_NETWORK_PACKAGES = ("monai.networks.", "torch.nn.")
#: The key of the network in a checkpoint holding several state dicts (MONAI's
#: ``CheckpointSaver`` default, ``MonaiAlgo``'s ``save_dict_key``).
_CHECKPOINT_KEY = "model"


class BundleError(ValueError):
    """A bundle that cannot be read, or whose network does not fit the weights."""


def read_bundle_config(root: str | Path, config_files: Iterable[str]) -> ConfigParser:
    """Read (and merge, in order) a bundle's config files into a parser.

    Only JSON and YAML are read (``yaml.safe_load``-style); nothing is evaluated.

    Parameters
    ----------
    root : str or Path
        The bundle's folder.
    config_files : Iterable[str]
        Config files relative to ``root``, e.g. ``["configs/train.json"]``.

    Raises
    ------
    BundleError
        If ``root`` is no folder or a config file is missing or unreadable (the
        message names it).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root}")
    paths = [root / name for name in config_files]
    for path in paths:
        if not path.is_file():
            raise BundleError(f"bundle config not found: {path}")
    try:
        return ConfigParser(ConfigParser.load_config_files([str(p) for p in paths]))
    except (ValueError, OSError) as err:
        raise BundleError(f"cannot read bundle config {paths}: {err}") from err


def _where(config_id: str) -> str:
    return f"'{config_id}'" if config_id else "the network"


class _SnapshotLocator(ComponentLocator):
    """MONAI's component locator, reading a copy of ``sys.modules``.

    Flower's simulation runs the ServerApp in a thread while its engine imports in
    another; iterating ``sys.modules`` itself then fails with "dictionary changed
    size during iteration".
    """

    def _find_module_names(self) -> list[str]:
        return [
            name
            for name in list(sys.modules)
            if name.startswith(self.MOD_START)
            and all(part not in name for part in self.excludes)
        ]


def _network_class(target: Any, config_id: str) -> type[torch.nn.Module]:
    """Return the ``torch.nn.Module`` class a ``_target_`` names, if it is allowed."""
    component = ConfigComponent({"_target_": target}, locator=_SnapshotLocator())
    name = component.resolve_module_name()
    if not isinstance(name, str) or not name.startswith(_NETWORK_PACKAGES):
        raise BundleError(
            f"{_where(config_id)} has _target_ {target!r}: the server builds only "
            f"torch.nn.Module classes of {', '.join(p[:-1] for p in _NETWORK_PACKAGES)}"
            f" from a bundle; ship the initial weights in {WEIGHTS_PATH} instead"
        )
    found = pydoc.locate(name)
    if not (
        isinstance(found, type)
        and issubclass(found, torch.nn.Module)
        and found.__module__.startswith(_NETWORK_PACKAGES)
    ):
        raise BundleError(
            f"{_where(config_id)} has _target_ {target!r} ({name}), which is no "
            "torch.nn.Module class of monai.networks or torch.nn"
        )
    return found


def _literal(value: Any, config_id: str) -> Any:
    """Turn a resolved (not evaluated) config value into plain Python values."""
    if isinstance(value, ConfigExpression):
        raise BundleError(
            f"{_where(config_id)} uses the Python expression {value.get_config()!r}; "
            "the server does not evaluate bundle code: write the value as a literal "
            f"(or an '@' reference to one), or ship the weights in {WEIGHTS_PATH}"
        )
    if isinstance(value, ConfigComponent):
        return _build(value.get_config(), config_id)
    if isinstance(value, Mapping):
        if "_target_" in value:
            return _build(value, config_id)
        return {k: _literal(v, f"{config_id}::{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_literal(v, f"{config_id}::{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise BundleError(f"{_where(config_id)} holds an unsupported value {value!r}")


def _build(config: Mapping[str, Any], config_id: str) -> torch.nn.Module:
    if config.get("_mode_", "default") != "default" or config.get("_disabled_"):
        raise BundleError(
            f"{_where(config_id)} sets _mode_ or _disabled_; the server builds "
            "networks in the default mode only"
        )
    cls = _network_class(config["_target_"], config_id)
    kwargs = {
        k: _literal(v, f"{config_id}::{k}")
        for k, v in config.items()
        if k not in ConfigComponent.non_arg_keys
    }
    try:
        return cls(**kwargs)
    except Exception as err:
        raise BundleError(
            f"cannot build {_where(config_id)} ({cls.__name__}): "
            f"{type(err).__name__}: {err}"
        ) from err


def network_from_bundle(
    root: str | Path,
    config_files: Iterable[str] = ("configs/train.json",),
    seed: int | None = None,
) -> torch.nn.Module:
    """Build a bundle's ``network_def`` without executing any of its code.

    ``@`` references are resolved; ``"$"`` expressions are refused; every
    ``_target_`` (the network's and those of nested components such as an
    activation) must be a :class:`torch.nn.Module` class of ``monai.networks`` or
    ``torch.nn``.

    Parameters
    ----------
    root : str or Path
        The bundle's folder.
    config_files : Iterable[str]
        The configs that define ``network_def`` (merged in order).
    seed : int, optional
        Seed of the weight initialisation (the global RNG is left as it was).

    Raises
    ------
    BundleError
        If the configs lack ``network_def``, or it cannot be built safely (the
        message names the offending config id).
    """
    files = list(config_files)
    parser = read_bundle_config(root, files)
    if NETWORK_ID not in parser:
        raise BundleError(f"bundle {root} defines no '{NETWORK_ID}' in {files}")
    resolved = parser.get_parsed_content(NETWORK_ID, instantiate=False, eval_expr=False)
    if not isinstance(resolved, ConfigComponent):
        raise BundleError(
            f"'{NETWORK_ID}' of bundle {root} is no component with a _target_"
        )
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        return _build(resolved.get_config(), NETWORK_ID)


def bundle_weights(root: str | Path) -> dict[str, torch.Tensor] | None:
    """Return the bundle's shipped weights (``models/model.pt``), if it has them.

    The file is read with ``weights_only=True``. A checkpoint holding several
    state dicts contributes its ``"model"`` entry, as in MONAI's ``MonaiAlgo``.

    Raises
    ------
    BundleError
        If the file holds no state dict of tensors.
    """
    path = Path(root).expanduser() / WEIGHTS_PATH
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BundleError(f"cannot read bundle weights {path}: {err}") from err
    if isinstance(state, Mapping) and isinstance(state.get(_CHECKPOINT_KEY), Mapping):
        state = state[_CHECKPOINT_KEY]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BundleError(f"{path} holds no state dict of tensors")
    return dict(state)


def check_global_arrays(
    received: Mapping[str, Any],
    network: torch.nn.Module,
    private: Iterable[str] = (),
    source: str = "the received global arrays",
) -> None:
    """Check that ``received`` holds exactly the network's shared keys and shapes.

    Parameters
    ----------
    received : Mapping[str, Any]
        Tensors or arrays by state-dict key (anything with a ``shape``).
    network : torch.nn.Module
        The network they must fit.
    private : Iterable[str]
        Keys that stay at the site and must not be in ``received``.
    source : str
        How the error message names ``received``.

    Raises
    ------
    BundleError
        Naming up to five missing keys, unexpected keys and shape mismatches.
    """
    state = network.state_dict()
    expected = set(state) - set(private)
    missing = sorted(expected - set(received))
    unexpected = sorted(set(received) - expected)
    shapes = [
        f"{k}: {tuple(received[k].shape)} != {tuple(state[k].shape)}"
        for k in sorted(expected & set(received))
        if tuple(received[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        raise BundleError(
            f"{source} do not match the bundle's network "
            f"({type(network).__name__}, {len(expected)} shared keys): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shapes (received != network) {shapes[:5]}"
        )


def bundle_model(settings: Settings) -> torch.nn.Module:
    """Build the run's initial global model from its bundle (``bundle.root``).

    The network comes from ``network_def`` of ``bundle.train-config``, initialised
    from the run's ``seed``; a bundle that ships ``models/model.pt`` starts from
    those weights, which must match the network key for key and shape for shape.

    Raises
    ------
    BundleError
        If the bundle cannot be read, its network cannot be built safely, or its
        shipped weights do not fit its network.
    """
    root = settings["bundle.root"]
    network = network_from_bundle(
        root, [settings["bundle.train-config"]], seed=settings["seed"]
    )
    weights = bundle_weights(root)
    if weights is not None:
        check_global_arrays(weights, network, source=f"the weights in {WEIGHTS_PATH}")
        network.load_state_dict(weights)
    return network
