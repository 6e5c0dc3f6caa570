"""Typed settings: every run-config value is converted and checked once, up front."""

import pytest
from flwr.app import Context, RecordDict

from flower_medimg.core.settings import (
    DEFAULTS,
    SETTINGS,
    SettingsError,
    UnknownSettingError,
    check_values,
    resolve_settings,
)
from flower_medimg.server_app import make_server_app
from flower_medimg.strategies.registry import build_strategy


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("num-server-rounds", -1, "a whole number >= 1"),
        ("num-server-rounds", "five", "a whole number"),
        ("num-server-rounds", 2.5, "a whole number"),
        ("num-server-rounds", True, "a whole number, got a boolean"),
        ("round-timeout", -1, "a number > 0"),
        ("gate.max-update-norm", -5, "a number >= 0"),
        ("train.batch-size", 0, "a whole number >= 1"),
        ("strategy.fraction-train", "half", "a number"),
        ("strategy.fraction-train", 1.5, "<= 1"),
        ("gate.enabled", "maybe", "true or false"),
        ("gate.enabled", 1, "true or false"),
        ("attack.kind", "bogus", "valid kinds: none, crash, eval-lie"),
        ("model.channels", "8,x", "channel widths"),
        ("attack.sites", "0,a", "partition ids"),
        ("method.names", "harmofl,moon", "client methods from harmofl"),
        ("stop.metric", "dice", "'<source>/<key>'"),
        ("stop.target", "high", "a number"),
        ("dp.delta", 1.0, "< 1"),
        ("train.lr", float("nan"), "a finite number"),
        ("output-dir", "", "a non-empty string"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(key, value, says):
    with pytest.raises(SettingsError) as error:
        resolve_settings({key: value})
    message = str(error.value)
    assert f"run config {key} = {value!r}" in message
    assert says in message


def test_values_are_converted_to_their_types():
    settings = resolve_settings(
        {
            "num-server-rounds": "7",
            "train.lr": 1,
            "gate.enabled": "false",
            "central-eval": "TRUE",
            "stop.target": "0.8",
            "model.name": "UNet",
            "model.channels": " 8, 16 ,32",
        }
    )
    assert settings["num-server-rounds"] == 7
    assert isinstance(settings["train.lr"], float) and settings["train.lr"] == 1.0
    assert settings["gate.enabled"] is False and settings["central-eval"] is True
    assert settings["stop.target"] == 0.8
    assert settings["model.name"] == "unet"
    assert settings["model.channels"] == "8,16,32"
    assert resolve_settings()["stop.target"] == ""


def test_settings_are_read_only_and_complete():
    settings = resolve_settings()
    assert list(settings) == [s.key for s in SETTINGS] == list(DEFAULTS)
    assert len(set(settings)) == len(SETTINGS)
    with pytest.raises(TypeError):
        settings["seed"] = 1  # type: ignore[index]


def test_values_that_must_fit_together():
    with pytest.raises(SettingsError, match="not a classification model"):
        resolve_settings({"task": "classification"})
    assert resolve_settings({"task": "classification", "model.name": "resnet10"})
    with pytest.raises(SettingsError, match="stats.range-min"):
        resolve_settings({"stats.range-min": 1.0, "stats.range-max": 0.5})
    # an app's own overrides are checked alone: the run config completes them
    assert check_values({"task": "classification"}) == {"task": "classification"}


def test_unknown_key_is_a_key_error_that_lists_the_valid_ones():
    with pytest.raises(UnknownSettingError, match="valid keys: .*attack.kind") as error:
        resolve_settings({"attack.knd": "nan"})
    assert isinstance(error.value, KeyError)
    assert str(error.value).startswith("Unknown run-config key 'attack.knd'")


def test_strategy_parameters_are_checked_against_the_constructor():
    with pytest.raises(SettingsError, match="strategy.proximal-mu = 'abc'"):
        build_strategy("fedprox", {"proximal-mu": "abc"})
    with pytest.raises(SettingsError, match="strategy.num-malicious-nodes = 1.5"):
        build_strategy("krum", {"num-malicious-nodes": 1.5})
    assert build_strategy("fedprox", {"proximal-mu": 1}).proximal_mu == 1.0


class RecordingGrid:
    """A Grid that records every call: a run must stop before the first."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        self.calls.append(name)
        raise AssertionError(f"the ServerApp used the grid ({name}) before failing")


@pytest.mark.parametrize(
    ("run_config", "says"),
    [
        ({"num-server-rounds": -1}, "num-server-rounds = -1"),
        # read by the sites only, checked by the server
        ({"attack.kind": "bogus"}, "attack.kind = 'bogus'"),
        ({"train.batch-size": 0}, "train.batch-size = 0"),
        ({"strategy.name": "fedsgd"}, "Unknown strategy 'fedsgd'"),
        ({"strategy.fraction-train": "half"}, "strategy.fraction-train = 'half'"),
        ({"strategy.alpha": 0.5}, "has no parameter 'alpha'"),
    ],
)
def test_the_server_app_stops_before_any_site_is_contacted(run_config, says):
    grid = RecordingGrid()
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(ValueError, match=says):
        make_server_app()(grid, context)
    assert grid.calls == []
