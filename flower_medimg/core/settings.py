"""The experiment's settings: every run-config key, converted and checked once.

Flower's run config (``[tool.flwr.app.config]`` in ``pyproject.toml``; nested tables
become dotted keys such as ``model.name``) is where an experiment is set. It arrives
as untyped TOML values, from a file, from ``flwr run --run-config`` or from code.
:func:`resolve_settings` turns it into :class:`Settings`: a frozen mapping with one
value of the right type for every key in :data:`SETTINGS`, each checked against its
type, range and allowed values, so that a bad value stops the run before anything
trains, with an error that names the key, the value and what is allowed.

:data:`SETTINGS` is the one place where a setting's default, type and bounds are
written; ``pyproject.toml`` documents the same table for users and a test keeps the
two equal. Strategy parameters (``strategy.<parameter>``) are open: besides the
sampling keys below, any parameter of the chosen strategy's constructor may be set;
:mod:`flower_medimg.strategies.registry` checks those against the constructor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .compression import CODECS, DOWNLINKS
from .models import CLASSIFICATION_MODELS, NORMS, SEGMENTATION_MODELS
from .private_params import PRIVATE_RULES
from .tasks import TASKS

__all__ = [
    "ATTACK_KINDS",
    "BUNDLE_TASK",
    "CLIENT_METHODS",
    "DEFAULTS",
    "GRAD_SAMPLE_MODES",
    "KEEP_POLICIES",
    "METRIC_SOURCES",
    "OPEN_PREFIXES",
    "OPTIMIZERS",
    "PRIVACY_FILTERS",
    "SETTINGS",
    "STOP_MODES",
    "USER_LEVEL_SIDES",
    "Setting",
    "Settings",
    "SettingsError",
    "UnknownSettingError",
    "check_values",
    "resolve_settings",
]

# ---- the vocabularies the settings choose from -----------------------------------
OPTIMIZERS = ("adam", "sgd")
#: Simulated misbehaving sites (``attack.kind``); ``none`` is every honest site.
ATTACK_KINDS = (
    "crash",
    "eval-lie",
    "free-rider",
    "garbage-bytes",
    "gaussian",
    "hang",
    "huge",
    "label-flip",
    "list-metric",
    "loss-lie",
    "mismatched-keys",
    "nan",
    "nova-a-lie",
    "num-examples-lie",
    "sign-flip",
)
#: Client-side methods (``method.names``); FedProx needs no switch.
CLIENT_METHODS = ("harmofl", "class-weights", "fedmax")
PRIVACY_FILTERS = ("none", "percentile", "svt")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")
USER_LEVEL_SIDES = ("none", "server", "client")
KEEP_POLICIES = ("all", "best+last")
STOP_MODES = ("auto", "min", "max")
#: The ``task`` whose sites run a MONAI bundle's own trainer and evaluator
#: (:mod:`flower_medimg.client_apps.bundle`) instead of the built-in networks.
BUNDLE_TASK = "bundle"
#: Sources of round metrics (``<source>/<key>``): the sites' aggregated train and
#: evaluate metrics, and the server's central evaluation.
METRIC_SOURCES = ("train", "evaluate", "central")

#: Sections whose keys are not fixed in advance: strategy parameters are checked
#: against the chosen strategy's constructor.
OPEN_PREFIXES = ("strategy.",)


class SettingsError(ValueError):
    """A run-config value of the wrong type, out of range or not allowed."""


class UnknownSettingError(KeyError, SettingsError):
    """A run-config key that is no setting."""

    def __str__(self) -> str:
        return str(self.args[0])


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _channels(text: str) -> str:
    widths = _comma_list(text)
    if not all(w.isdigit() and int(w) > 0 for w in widths):
        raise ValueError(
            "expected comma-separated positive channel widths, e.g. '8,16,32'"
        )
    return ",".join(widths)


def _site_ids(text: str) -> str:
    ids = _comma_list(text)
    if not all(i.isdigit() for i in ids):
        raise ValueError("expected comma-separated partition ids, e.g. '0,3'")
    return ",".join(ids)


def _method_names(text: str) -> str:
    names = [n.lower() for n in _comma_list(text) if n.lower() != "none"]
    unknown = [n for n in names if n not in CLIENT_METHODS]
    if unknown:
        raise ValueError(
            f"expected comma-separated client methods from {', '.join(CLIENT_METHODS)} "
            "(FedProx is on whenever the strategy sends proximal-mu)"
        )
    return ",".join(names)


def _private_rule(text: str) -> str:
    rule = text.strip().lower()
    if rule in ("", *PRIVATE_RULES):
        return rule or "none"
    if not _comma_list(rule):
        raise ValueError(f"expected one of {', '.join(PRIVATE_RULES)} or key prefixes")
    return text.strip()


_METRIC_NAME = re.compile(rf"^({'|'.join(METRIC_SOURCES)})/\S+$")


def _metric_name(text: str) -> str:
    if not _METRIC_NAME.match(text):
        raise ValueError(
            f"expected '<source>/<key>' with source one of {', '.join(METRIC_SOURCES)} "
            "(e.g. 'evaluate/eval-loss', 'central/dice')"
        )
    return text


def _optional_metric_name(text: str) -> str:
    return _metric_name(text) if text.strip() else ""


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty string")
    return text


@dataclass(frozen=True)
class Setting:
    """One run-config key: its default, its type and the values it allows.

    Parameters
    ----------
    key : str
        The dotted run-config key.
    default : bool, int, float or str
        The default; its type is the setting's type.
    minimum, maximum : float, optional
        Inclusive bounds of a number.
    above : float, optional
        Exclusive lower bound of a number.
    below : float, optional
        Exclusive upper bound of a number.
    choices : tuple of str, optional
        The allowed values of a string (compared in lower case).
    parse : callable, optional
        ``str -> str`` that checks (and normalises) a string; raises ``ValueError``
        whose message says what is allowed.
    optional_number : bool
        A number that may also be ``""`` (off); the default is ``""``.
    noun : str
        What the choices are, in error messages (``valid filters: ...``).
    """

    key: str
    default: bool | int | float | str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], str] | None = None
    optional_number: bool = False
    noun: str = "values"

    def convert(self, value: Any) -> bool | int | float | str:
        """Return ``value`` as this setting's type, checked.

        Raises
        ------
        SettingsError
            Naming the key, the value and what is allowed.
        """
        try:
            converted = self._typed(value)
            if isinstance(converted, str):
                return self._checked_string(converted)
            if not isinstance(converted, bool):
                self._check_range(converted)
            return converted
        except ValueError as err:
            raise SettingsError(
                f"run config {self.key} = {value!r} is not valid: {err}"
            ) from None

    def _typed(self, value: Any) -> bool | int | float | str:
        kind = type(self.default)
        if self.optional_number:
            if isinstance(value, str) and not value.strip():
                return ""
            return _as_float(value)
        if kind is bool:
            return _as_bool(value)
        if kind is int:
            return _as_int(value)
        if kind is float:
            return _as_float(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return value

    def _checked_string(self, value: str) -> str:
        if self.parse is not None:
            return self.parse(value)
        if self.choices is not None:
            if value.strip().lower() not in self.choices:
                raise ValueError(f"valid {self.noun}: {', '.join(self.choices)}")
            return value.strip().lower()
        return value

    def _check_range(self, value: float) -> None:
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        if self.below is not None:
            bounds.append(f"< {self.below:g}")
        inside = (
            (self.minimum is None or value >= self.minimum)
            and (self.above is None or value > self.above)
            and (self.maximum is None or value <= self.maximum)
            and (self.below is None or value < self.below)
        )
        if not inside:
            kind = "whole number" if type(self.default) is int else "number"
            raise ValueError(f"expected a {kind} {' and '.join(bounds)}")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("expected true or false")


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError("expected a whole number")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


#: Every setting, in the order of ``pyproject.toml``'s run-config table.
SETTINGS: tuple[Setting, ...] = (
    Setting("task", "segmentation", choices=(*TASKS, BUNDLE_TASK), noun="tasks"),
    Setting("num-server-rounds", 5, minimum=1),
    Setting("seed", 0, minimum=0),
    Setting("output-dir", "outputs", parse=_non_empty),
    Setting("central-eval", True),
    Setting("round-timeout", 600.0, above=0),
    Setting("node-wait-timeout", 300.0, above=0),
    Setting("private-params", "none", parse=_private_rule),
    Setting(
        "model.name",
        "unet",
        choices=(*SEGMENTATION_MODELS, *CLASSIFICATION_MODELS),
        noun="models",
    ),
    Setting("model.spatial-dims", 2, minimum=2, maximum=3),
    Setting("model.norm", "instance", choices=NORMS, noun="norms"),
    Setting("model.channels", "", parse=_channels),
    Setting("train.local-epochs", 1, minimum=1),
    Setting("train.lr", 0.005, above=0),
    Setting("train.optimizer", "adam", choices=OPTIMIZERS, noun="optimizers"),
    Setting("train.momentum", 0.0, minimum=0, below=1),
    Setting("train.batch-size", 8, minimum=1),
    Setting("train.report-losses", False),
    Setting("data.num-sites", 4, minimum=1),
    Setting("data.image-size", 64, minimum=8),
    Setting("data.samples-per-site", 32, minimum=1),
    Setting("data.val-fraction", 0.25, above=0, below=1),
    Setting("data.quantity-skew", 0.5, minimum=0),
    Setting("data.scanner-shift", 1.0, minimum=0),
    Setting("data.label-skew", 0.0, minimum=0),
    Setting("data.num-classes", 2, minimum=2),
    Setting("gate.enabled", True),
    Setting("gate.max-update-norm", 0.0, minimum=0),
    Setting("gate.update-norm-factor", 3.0, minimum=0),
    Setting("gate.min-cosine", 0.0, minimum=-1, maximum=1),
    Setting("gate.max-abs-value", 1e6, minimum=0),
    Setting("gate.max-num-examples", 1_000_000, minimum=0),
    Setting("gate.max-weight-share", 0.5, above=0, maximum=1),
    Setting("strategy.name", "fedavg", parse=lambda name: _non_empty(name).lower()),
    Setting("strategy.weighted-by-key", "num-examples", parse=_non_empty),
    Setting("strategy.fraction-train", 1.0, minimum=0, maximum=1),
    Setting("strategy.fraction-evaluate", 1.0, minimum=0, maximum=1),
    Setting("strategy.min-train-nodes", 2, minimum=0),
    Setting("strategy.min-evaluate-nodes", 2, minimum=0),
    Setting("strategy.min-available-nodes", 2, minimum=0),
    Setting("dp.noise-multiplier", 0.0, minimum=0),
    Setting("dp.target-epsilon", 0.0, minimum=0),
    Setting("dp.max-grad-norm", 1.0, above=0),
    Setting("dp.delta", 1e-5, above=0, below=1),
    Setting("dp.grad-sample-mode", "auto", choices=GRAD_SAMPLE_MODES, noun="modes"),
    Setting("dp.user-level", "none", choices=USER_LEVEL_SIDES, noun="sides"),
    Setting("dp.user-noise-multiplier", 1.0, minimum=0),
    Setting("dp.user-clipping-norm", 1.0, above=0),
    Setting("dp.user-num-sampled", 0, minimum=0),
    Setting("dp.allow-data-dependent-weights", False),
    Setting("privacy.filter", "none", choices=PRIVACY_FILTERS, noun="filters"),
    Setting("privacy.share", 1.0, above=0, maximum=1),
    Setting("privacy.gamma", 0.0, minimum=0),
    Setting("privacy.tau", 0.0, minimum=0),
    Setting("privacy.epsilon", 1.0, above=0),
    Setting("privacy.release-epsilon", 0.0, minimum=0),
    Setting("secagg.enabled", False),
    Setting("secagg.num-shares", 0, minimum=0),
    Setting("secagg.threshold", 0, minimum=0),
    Setting("secagg.clipping-range", 1.0, above=0),
    Setting("secagg.quantization-bits", 24, minimum=2, maximum=30),
    Setting("compression.codec", "none", choices=CODECS, noun="codecs"),
    Setting("compression.fraction", 0.1, above=0, maximum=1),
    Setting("compression.downlink", "none", choices=DOWNLINKS, noun="downlinks"),
    Setting("he.enabled", False),
    Setting("he.context-dir", ""),
    Setting("he.keys", ""),
    Setting("method.names", "", parse=_method_names),
    Setting("method.harmofl-window", 0.0, minimum=0, maximum=0.5),
    Setting("method.harmofl-momentum", 0.1, minimum=0, maximum=1),
    Setting("method.harmofl-alpha", 0.05, minimum=0),
    Setting("method.fedmax-beta", 1000.0, minimum=0),
    Setting("sim.dropout", 0.0, minimum=0, below=1),
    Setting("attack.kind", "none", choices=("none", *ATTACK_KINDS), noun="kinds"),
    Setting("attack.sites", "", parse=_site_ids),
    Setting("stop.metric", "evaluate/median-eval-loss", parse=_metric_name),
    Setting("stop.mode", "auto", choices=STOP_MODES, noun="modes"),
    Setting("stop.target", "", optional_number=True),
    Setting("stop.patience", 0, minimum=0),
    Setting("stop.min-delta", 0.0, minimum=0),
    Setting("stop.best-metric", "", parse=_optional_metric_name),
    Setting("stop.max-empty-rounds", 3, minimum=0),
    Setting("registry.path", "registry"),
    Setting("registry.keep", "best+last", choices=KEEP_POLICIES, noun="policies"),
    Setting("registry.resume", True),
    Setting("registry.key-path", ""),
    Setting("registry.lock-timeout", 60.0, above=0),
    Setting("stats.enabled", True),
    Setting("stats.bins", 32, minimum=1),
    Setting("stats.range-min", 0.0),
    Setting("stats.range-max", 1.0),
    Setting("stats.flag-distance", 0.1, above=0, maximum=1),
    Setting("stats.flag-factor", 1.5, above=0),
    Setting("cross-site.enabled", True),
    Setting("bundle.root", ""),
    Setting("bundle.train-config", "configs/train.json", parse=_non_empty),
    Setting("bundle.evaluate-config", "configs/evaluate.json"),
    Setting("bundle.send-weight-diff", False),
)

_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}

#: Every setting's default, by key (what ``pyproject.toml``'s table holds).
DEFAULTS: dict[str, Any] = {s.key: s.default for s in SETTINGS}


class Settings(Mapping[str, Any]):
    """A run's settings: every key of :data:`SETTINGS` with a checked value.

    A read-only mapping from dotted run-config keys to values (plus any
    ``strategy.<parameter>`` given); build it with :func:`resolve_settings`.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"

    def section(self, prefix: str) -> dict[str, Any]:
        """Return the keys under ``prefix.`` with the prefix removed."""
        start = f"{prefix}."
        return {k[len(start) :]: v for k, v in self.items() if k.startswith(start)}

    @property
    def num_classes(self) -> int:
        """Output classes of the network: image classes, or background + lesion."""
        return self["data.num-classes"] if self["task"] == "classification" else 2

    @property
    def dp_sgd(self) -> bool:
        """Whether sample-level DP-SGD is on at the sites."""
        return self["dp.noise-multiplier"] > 0 or self["dp.target-epsilon"] > 0

    @property
    def client_methods(self) -> tuple[str, ...]:
        """The switched-on client-side methods (``method.names``)."""
        return tuple(_comma_list(self["method.names"]))


def resolve_settings(
    run_config: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge ``DEFAULTS``, Flower's run config and overrides; check every value.

    Parameters
    ----------
    run_config : Mapping, optional
        ``context.run_config`` as Flower hands it to the app.
    overrides : Mapping, optional
        Settings given in code (``make_server_app(**overrides)``), which win.

    Returns
    -------
    Settings
        Every setting, converted to its type and checked.

    Raises
    ------
    UnknownSettingError
        For a key that is neither a setting nor under an open section; the message
        lists the valid keys.
    SettingsError
        For a value of the wrong type, out of range, not allowed, or in conflict
        with another setting; the message names the key, the value and what is
        allowed.
    """
    values = {**DEFAULTS, **(run_config or {}), **(overrides or {})}
    checked = check_values(values)
    _check_combinations(checked)
    return Settings(checked)


def check_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Convert and check each of ``values`` on its own (no combination checks).

    ``make_client_app(**overrides)`` uses it to fail at once on a bad override,
    before the run config that completes it is known.

    Raises
    ------
    UnknownSettingError, SettingsError
        As :func:`resolve_settings`.
    """
    checked = {}
    for key, value in values.items():
        if key in _BY_KEY:
            checked[key] = _BY_KEY[key].convert(value)
        elif key.startswith(OPEN_PREFIXES):
            checked[key] = value
        else:
            raise UnknownSettingError(
                f"Unknown run-config key {key!r}; valid keys: "
                f"{', '.join(sorted(DEFAULTS))} (and any 'strategy.<parameter>')"
            )
    return checked


def _check_combinations(values: Mapping[str, Any]) -> None:
    """Check what no single setting can: values that must fit together."""
    if values["task"] == BUNDLE_TASK:
        _check_bundle(values)
    else:
        _check_model(values)
    if values["secagg.enabled"]:
        _check_secagg(values)
    if values["he.enabled"]:
        _check_he(values)
    if not values["stats.range-min"] < values["stats.range-max"]:
        raise SettingsError(
            f"run config stats.range-min = {values['stats.range-min']!r} must be "
            f"below stats.range-max = {values['stats.range-max']!r}"
        )


def _check_secagg(values: Mapping[str, Any]) -> None:
    """Refuse what secure aggregation cannot do: read a single site's update."""
    if values["he.enabled"]:
        raise SettingsError(
            "run config secagg.enabled and he.enabled are two ways to hide the "
            "sites' updates; choose one"
        )
    if values["compression.downlink"] != "none":
        raise SettingsError(
            "run config compression.downlink cannot be used with secagg.enabled: "
            "each site masks its update against the model it received, which must "
            "be the server's"
        )
    if values["compression.codec"] not in ("none", "int8"):
        raise SettingsError(
            f"run config compression.codec = {values['compression.codec']!r} cannot "
            "be used with secagg.enabled: the masked sum needs every site's update "
            "in the same integer form; use 'int8' (8-bit SecAgg+ quantisation)"
        )
    if values["dp.user-level"] == "server":
        raise SettingsError(
            "run config dp.user-level = 'server' clips each site's update at the "
            "server, which secagg.enabled hides; use dp.user-level = 'client'"
        )
    norm_checks = {
        "gate.max-update-norm": values["gate.max-update-norm"] > 0,
        "gate.update-norm-factor": values["gate.update-norm-factor"] > 0,
        "gate.min-cosine": values["gate.min-cosine"] > -1,
    }
    on = [key for key, value in norm_checks.items() if value]
    if values["gate.enabled"] and on:
        raise SettingsError(
            f"run config {', '.join(on)} check each site's update, which "
            "secagg.enabled hides from the server; turn them off "
            "(gate.max-update-norm = 0, gate.update-norm-factor = 0, "
            "gate.min-cosine = -1) and bound updates at the sites instead "
            "(secagg.clipping-range, dp.user-level = 'client', the site policy)"
        )


def _check_he(values: Mapping[str, Any]) -> None:
    """Refuse what the server cannot do on ciphertexts."""
    if not values["he.context-dir"].strip():
        raise SettingsError(
            "run config he.enabled needs he.context-dir: the folder written by "
            "`flower-medimg he provision` (the server reads he-public.ctx there)"
        )
    if (
        values["compression.codec"] != "none"
        or values["compression.downlink"] != "none"
    ):
        raise SettingsError(
            "run config compression.codec and compression.downlink cannot be used "
            "with he.enabled: ciphertexts do not compress"
        )
    if values["dp.user-level"] == "server":
        raise SettingsError(
            "run config dp.user-level = 'server' clips each site's update at the "
            "server, which he.enabled encrypts; use dp.user-level = 'client'"
        )
    if values["central-eval"]:
        raise SettingsError(
            "run config he.enabled keeps the global model encrypted at the server, "
            "so it cannot evaluate it: set central-eval = false"
        )


def _check_model(values: Mapping[str, Any]) -> None:
    segmentation = values["task"] == "segmentation"
    models = SEGMENTATION_MODELS if segmentation else CLASSIFICATION_MODELS
    if values["model.name"] not in models:
        raise SettingsError(
            f"run config model.name = {values['model.name']!r} is not a "
            f"{values['task']} model; valid models: {', '.join(models)}"
        )


def _check_bundle(values: Mapping[str, Any]) -> None:
    """Refuse what a bundle replaces: its trainer brings optimizer, loss and loader."""
    if not values["bundle.root"].strip():
        raise SettingsError(
            f"run config task = {BUNDLE_TASK!r} needs bundle.root: the folder of the "
            "MONAI bundle (with configs/train.json) the server builds the global "
            "model from"
        )
    dp_sgd = values["dp.noise-multiplier"] > 0 or values["dp.target-epsilon"] > 0
    refused = {
        "dp.noise-multiplier / dp.target-epsilon (DP-SGD)": dp_sgd,
        "method.names": bool(_comma_list(values["method.names"])),
        "attack.kind": values["attack.kind"] != "none",
    }
    for key, on in refused.items():
        if on:
            raise SettingsError(
                f"run config {key} cannot be used with task = {BUNDLE_TASK!r}: the "
                "bundle's own SupervisedTrainer builds the optimizer, loss and data "
                "loader, which DP-SGD (Opacus), the client methods and the simulated "
                "attacks replace; use user-level DP (dp.user-level) or the privacy "
                "filters instead"
            )
