import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import FedAvg

from flower_medimg.core.settings import DEFAULTS, Settings, resolve_settings
from flower_medimg.strategies.registry import (
    STRATEGIES,
    build_strategy,
    strategy_parameters,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_equals_code_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert run_config == DEFAULTS


def test_resolve_precedence_and_unknown_key():
    config = resolve_settings({"seed": 3, "model.name": "UNet"}, {"seed": 4})
    assert config["seed"] == 4
    assert config["model.name"] == "unet"
    assert config["strategy.name"] == "fedavg"
    with pytest.raises(KeyError, match="Unknown run-config key 'model.nmae'"):
        resolve_settings({"model.nmae": "unet"})
    # strategy parameters are open: checked against the strategy later
    assert (
        resolve_settings({"strategy.proximal-mu": 0.1})["strategy.proximal-mu"] == 0.1
    )


def test_section_strips_prefix():
    assert Settings({"a.b": 1, "a.c": 2, "b.a": 3}).section("a") == {"b": 1, "c": 2}


FLOWER_NAMES = [
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]


@pytest.mark.parametrize("name", FLOWER_NAMES)
def test_registry_builds_each_flower_strategy(name):
    strategy = build_strategy(name, {"fraction-train": 0.5, "min-train-nodes": 3})
    assert isinstance(strategy, STRATEGIES[name])
    assert isinstance(strategy, flwr_strategy.Strategy)
    assert strategy.fraction_train == 0.5
    assert strategy.min_train_nodes == 3


OUR_NAMES = [
    "fast-fedavg", "fast-fedmedian", "fast-fedtrimmedavg", "fedcostwavg",
    "fedfocus", "dos", "fednova", "cyclic",
]  # fmt: skip


@pytest.mark.parametrize("name", OUR_NAMES)
def test_registry_builds_each_of_our_strategies(name):
    strategy = build_strategy(name, {"min-train-nodes": 3}, max_update_norm=5.0)
    assert isinstance(strategy, FedAvg)  # drop-in: a Flower FedAvg subclass
    assert strategy.min_train_nodes == 3
    assert strategy.max_update_norm == 5.0


def test_registry_passes_strategy_specific_parameters():
    strategy = build_strategy("FedProx", {"proximal-mu": 0.25})
    assert strategy.proximal_mu == 0.25
    krum = build_strategy("krum", {"num-malicious-nodes": 2})
    assert krum.num_malicious_nodes == 2


def test_code_params_only_where_accepted():
    def aggr(records, key):
        return None

    strategy = build_strategy("fedavg", {}, train_metrics_aggr_fn=aggr, unused=1)
    assert strategy.train_metrics_aggr_fn is aggr


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError, match="valid strategies: fedavg, fedprox"):
        build_strategy("fedsgd")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(
        ValueError, match="has no parameter 'proximal-mu'.*fraction-train"
    ):
        build_strategy("fedavg", {"proximal-mu": 0.1})
    assert "proximal-mu" in strategy_parameters("fedprox")
