"""Client-side methods: HarmoFL, FedProx, class-weighted loss, simulated dropouts.

The worked examples are those of ``algorithms.md`` §1.8-1.10.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from flower_medimg.client_apps import make_client_app
from flower_medimg.client_apps.dropouts import dropped_out, failing_sites
from flower_medimg.client_apps.methods import (
    ClientMethods,
    balanced_class_weights,
    class_counts,
    fedmax_penalty,
    fedmax_term,
    perturbed_step,
    proximal_penalty,
    proximal_term,
    weighted_loss,
)
from flower_medimg.core.amp_norm import AmpNorm, amplitude_normalize, window_slices
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings

ATOL = 1e-6
TINY = {
    "model.channels": "4,8,16",
    "data.image-size": 32,
    "data.samples-per-site": 12,
    "data.quantity-skew": 0.0,
    "train.batch-size": 4,
}


# --- HarmoFL ------------------------------------------------------------------------


def test_harmofl_dc_only_worked_example():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    assert torch.allclose(
        torch.fft.fft2(x).abs()[0, 0], torch.tensor([[10.0, 2], [4, 0]])
    )
    running = torch.full((1, 2, 2), 7.0)  # only the DC bin (index [0, 0]) is used
    running[0, 0, 0] = 20.0
    out = amplitude_normalize(x, running, window_ratio=0.0)
    expected = torch.tensor([[3.5, 4.5], [5.5, 6.5]])  # x + (20 - 10) / 4
    assert torch.allclose(out[0, 0], expected, atol=ATOL)


def test_harmofl_full_spectrum_worked_example_and_real_momentum():
    x_a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    x_b = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    amp_norm = AmpNorm(1, (2, 2), window_ratio=0.5, momentum=0.1).train()
    out = amp_norm(torch.stack([x_a, x_b])[:, None])
    # the first batch sets the running amplitude to the batch mean
    assert torch.allclose(amp_norm.running_amp, torch.full((1, 2, 2), 1.5))
    assert torch.allclose(out[0, 0], torch.tensor([[1.5, 0.0], [0.0, 0.0]]), atol=ATOL)
    assert torch.allclose(out[1, 0], torch.tensor([[0.0, 0.0], [0.0, 1.5]]), atol=ATOL)
    # a real momentum: 0.9 * 1.5 + 0.1 * |FFT(x_a)| = 1.45 (an int momentum keeps 1.5)
    amp_norm(x_a[None, None])
    assert torch.allclose(amp_norm.running_amp, torch.full((1, 2, 2), 1.45))
    # eval mode and a fixed amplitude use the stored amplitude as it is
    amp_norm.eval()(x_b[None, None])
    amp_norm.train().fixed = True
    amp_norm(x_b[None, None])
    assert torch.allclose(amp_norm.running_amp, torch.full((1, 2, 2), 1.45))


def test_harmofl_window_and_bad_input():
    assert window_slices((8, 8), 0.0) == (slice(4, 5), slice(4, 5))
    assert window_slices((8, 6), 0.25) == (slice(3, 6), slice(2, 5))
    assert window_slices((2, 2), 0.5) == (slice(0, 2), slice(0, 2))
    with pytest.raises(ValueError, match="window ratio"):
        window_slices((8, 8), -0.1)
    with pytest.raises(ValueError, match="momentum"):
        AmpNorm(1, (8, 8), momentum=1.5)
    with pytest.raises(ValueError, match=r"inputs of shape \(B, 1, 8, 8\)"):
        AmpNorm(1, (8, 8))(torch.zeros(2, 1, 8, 9))


def test_harmofl_fresh_amplitude_passes_input_through():
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(AmpNorm(1, (8, 8)).eval()(x), x)


def test_harmofl_3d_shapes_and_dc():
    images = torch.rand(3, 1, 6, 8, 10)
    running = torch.rand(1, 6, 8, 10)
    out = amplitude_normalize(images, running, window_ratio=0.0)
    assert out.shape == images.shape and out.dtype == images.dtype
    # DC only: every volume's sum becomes the running DC amplitude
    sums = out.sum(dim=(2, 3, 4))
    assert torch.allclose(sums, running[0, 0, 0, 0].expand(3, 1), atol=1e-4)
    # the other frequencies are untouched
    residual = out - out.mean(dim=(2, 3, 4), keepdim=True)
    original = images - images.mean(dim=(2, 3, 4), keepdim=True)
    assert torch.allclose(residual, original, atol=1e-5)


def test_harmofl_network_keeps_its_keys_and_adds_the_amplitude():
    base = {**TINY, "model.spatial-dims": 3, "data.image-size": 16}
    plain = model_from_settings(resolve_settings(overrides=base))
    config = resolve_settings(overrides={**base, "method.names": "harmofl"})
    model = model_from_settings(config).train()
    keys = list(model.state_dict())
    assert keys[: len(plain.state_dict())] == list(plain.state_dict())
    assert keys[-1] == "amp_norm.running_amp"
    assert model.state_dict()["amp_norm.running_amp"].shape == (1, 16, 16, 16)
    out = model(torch.rand(2, 1, 16, 16, 16))
    assert out.shape == (2, 2, 16, 16, 16)
    assert torch.any(model.amp_norm.running_amp != 0)  # the forward pass updated it


def test_weight_perturbation_worked_example():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    holder = nn.Module()
    holder.w = w
    optimizer = torch.optim.SGD([w], lr=0.1)
    seen = []

    def objective():
        seen.append(w.detach().clone())
        return 0.5 * (w**2).sum()

    loss = perturbed_step(holder, objective, optimizer, alpha=0.05)
    assert float(loss) == pytest.approx(2.5)
    assert torch.allclose(seen[1], torch.tensor([1.022361, 2.044721]), atol=ATOL)
    assert torch.allclose(w.detach(), torch.tensor([0.897764, 1.795528]), atol=ATOL)


def test_weight_perturbation_counts_each_batch_once_in_running_stats():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    reference = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    reference.load_state_dict(net.state_dict())
    x = torch.rand(4, 1, 6, 6)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    perturbed_step(net, lambda: net(x).pow(2).mean(), optimizer, alpha=0.05)
    reference(x)  # one ordinary training-mode pass
    assert torch.allclose(net[1].running_mean, reference[1].running_mean)
    assert torch.allclose(net[1].running_var, reference[1].running_var)
    assert net[1].momentum == reference[1].momentum


# --- FedProx ------------------------------------------------------------------------


def test_fedprox_worked_example_squared_norm():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    term = proximal_term([w], [torch.zeros(2)], mu=0.1)
    assert float(term.detach()) == pytest.approx(0.25, abs=ATOL)
    unsquared = 0.1 / 2 * math.sqrt(5)  # Flower's FedProx docstring
    assert float(term.detach()) != pytest.approx(unsquared, abs=1e-3)
    term.backward()
    assert torch.allclose(w.grad, torch.tensor([0.1, 0.2]), atol=ATOL)


def test_fedprox_penalty_skips_private_params_and_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    penalty = proximal_penalty(net, ["2.weight", "2.bias"], mu=1.0)
    assert proximal_penalty(net, [], mu=0.0) is None
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.add_(5.0)
    # shared parameters: linear 0 (6 values) + BN affine (4 values), each moved by 1
    assert float(penalty().detach()) == pytest.approx(0.5 * 10)


def _site_context(partition_id=0, num_partitions=2):
    return Context(
        run_id=1,
        node_id=10 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )


def _train_message(arrays, server_round=1, **config):
    content = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord({"server-round": server_round, **config}),
        }
    )
    return Message(content=content, dst_node_id=10, message_type="train")


@pytest.fixture(scope="module")
def global_arrays():
    torch.manual_seed(0)
    return ArrayRecord(
        model_from_settings(resolve_settings(overrides=TINY)).state_dict()
    )


def _distance(arrays, reference):
    a, b = arrays.to_torch_state_dict(), reference.to_torch_state_dict()
    return math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a))


def test_fedprox_mu_zero_is_plain_training_and_mu_pulls_towards_global(global_arrays):
    app = make_client_app(**TINY, **{"train.optimizer": "sgd", "train.lr": 0.05})
    plain = app(_train_message(global_arrays), _site_context())
    zero = app(_train_message(global_arrays, **{"proximal-mu": 0.0}), _site_context())
    prox = app(_train_message(global_arrays, **{"proximal-mu": 50.0}), _site_context())
    for reply in (plain, zero, prox):
        assert not reply.has_error(), reply.error
    a = plain.content["arrays"].to_torch_state_dict()
    b = zero.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _distance(prox.content["arrays"], global_arrays) < _distance(
        plain.content["arrays"], global_arrays
    )
    with pytest.raises(ValueError, match="proximal-mu"):
        app(_train_message(global_arrays, **{"proximal-mu": -1.0}), _site_context())


# --- class-weighted loss ------------------------------------------------------------


def test_class_weights_worked_example():
    assert np.allclose(balanced_class_weights([90, 10]), [0.555556, 5.0], atol=ATOL)
    assert np.allclose(balanced_class_weights([30, 0, 10]), [40 / 90, 1.0, 40 / 30])
    assert np.allclose(balanced_class_weights([7, 7]), [1.0, 1.0])
    with pytest.raises(ValueError, match="all zero"):
        balanced_class_weights([0, 0])
    assert class_counts([0, 1, 1, 1], 2).tolist() == [1, 3]
    assert class_counts([torch.tensor([[0, 1], [1, 1]])], 2).tolist() == [1, 3]


def test_weighted_cross_entropy_is_the_weighted_mean():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    loss = weighted_loss("classification", [90, 10])(logits, labels)
    w = torch.tensor([100 / 180, 5.0])[labels]
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert float(loss) == pytest.approx(float((w * ce).sum() / w.sum()), abs=ATOL)
    seg = weighted_loss("segmentation", [900, 100])
    value = seg(torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 1, 8, 8)))
    assert torch.isfinite(value)


def test_class_weighted_fedmax_training_through_the_client_app():
    overrides = {
        **TINY,
        "task": "classification",
        "model.name": "resnet10",
        "model.channels": "4,8,8,16",
        "data.label-skew": 2.0,
        "method.names": "class-weights,fedmax",
    }
    arrays = ArrayRecord(
        model_from_settings(resolve_settings(overrides=overrides)).state_dict()
    )
    reply = make_client_app(**overrides)(_train_message(arrays), _site_context())
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["num-examples"] > 0


# --- FedMax -------------------------------------------------------------------------


def test_fedmax_worked_example():
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert float(fedmax_term(a, beta=1.0)) == pytest.approx(0.108445, abs=ATOL)
    assert float(fedmax_term(a, beta=10.0)) == pytest.approx(1.08445, abs=1e-5)
    # "batchmean" (divide by B only) would give 0.216890
    assert float(fedmax_term(a, 1.0)) != pytest.approx(0.216890, abs=1e-3)
    assert float(fedmax_term(torch.zeros(3, 4), 1.0)) == pytest.approx(0.0)


def test_fedmax_penalty_uses_the_last_linear_layers_input():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    penalty = fedmax_penalty(net, beta=2.0)
    x = torch.randn(5, 3)
    net(x)
    expected = fedmax_term(torch.relu(net[0](x)), 2.0)
    assert float(penalty().detach()) == pytest.approx(float(expected.detach()))
    unet = model_from_settings(resolve_settings(overrides=TINY))
    with pytest.raises(ValueError, match="FedMax needs a classification network"):
        fedmax_penalty(unet, 1.0)
    with pytest.raises(ValueError, match="fedmax-beta"):
        fedmax_penalty(net, -1.0)


# --- run-config handling ------------------------------------------------------------


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'harmofll'.*harmofl, class-weights"):
        ClientMethods.from_settings(
            resolve_settings(overrides={"method.names": "harmofll"})
        )
    both = ClientMethods.from_settings(
        resolve_settings(overrides={"method.names": "HarmoFL, class-weights"})
    )
    assert both.harmofl and both.class_weights and both.perturbation == 0.05
    assert ClientMethods.from_settings(resolve_settings()).perturbation == 0.0


def test_methods_refuse_dp_sgd():
    config = resolve_settings(
        overrides={"method.names": "harmofl", "dp.noise-multiplier": 1.0}
    )
    with pytest.raises(ValueError, match="harmofl cannot run with DP-SGD"):
        ClientMethods.from_settings(config)


# --- HarmoFL through the ClientApp ---------------------------------------------------


def test_harmofl_client_shares_amplitude_then_keeps_it_fixed():
    overrides = {**TINY, "method.names": "harmofl"}
    arrays = ArrayRecord(
        model_from_settings(resolve_settings(overrides=overrides)).state_dict()
    )
    app = make_client_app(**overrides)
    first = app(_train_message(arrays, server_round=1), _site_context())
    assert not first.has_error(), first.error
    amp = first.content["arrays"]["amp_norm.running_amp"].numpy()
    assert amp.shape == (1, 32, 32) and np.all(np.isfinite(amp)) and amp.max() > 0
    second = app(
        _train_message(first.content["arrays"], server_round=2), _site_context()
    )
    assert not second.has_error(), second.error
    assert np.array_equal(second.content["arrays"]["amp_norm.running_amp"].numpy(), amp)


# --- simulated dropouts ---------------------------------------------------------------


def test_dropouts_fail_a_fixed_fraction_each_round():
    draws = [failing_sites(0.25, 8, seed=3, server_round=r) for r in range(1, 6)]
    assert all(len(d) == 2 for d in draws)
    assert len({frozenset(d) for d in draws}) > 1  # not always the same sites
    assert failing_sites(0.25, 8, seed=3, server_round=2) == draws[1]
    assert failing_sites(0.0, 8, seed=3, server_round=1) == set()
    with pytest.raises(ValueError, match=r"sim.dropout must be in \[0, 1\)"):
        failing_sites(1.0, 4, 0, 1)
    config = resolve_settings(overrides={"sim.dropout": 0.5, "seed": 3})
    failed = [dropped_out(config, _site_context(k, 4), 1) for k in range(4)]
    assert sum(failed) == 2
    deployed = Context(1, 1, {"data-dir": "/site"}, RecordDict(), {})
    assert not dropped_out(config, deployed, 1)


def test_dropped_site_raises_so_flower_records_an_error(global_arrays):
    config = {**TINY, "sim.dropout": 0.5, "seed": 0}
    failing = failing_sites(0.5, 2, seed=0, server_round=1)
    app = make_client_app(**config)
    (site,) = failing
    with pytest.raises(RuntimeError, match="simulated dropout in round 1"):
        app(_train_message(global_arrays), _site_context(site, 2))
    reply = app(_train_message(global_arrays), _site_context(1 - site, 2))
    assert not reply.has_error()
