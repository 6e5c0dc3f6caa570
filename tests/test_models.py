import pytest
import torch

from flower_medimg.core.models import (
    CLASSIFICATION_MODELS,
    SEGMENTATION_MODELS,
    build_model,
    model_from_settings,
    parse_channels,
)
from flower_medimg.core.settings import resolve_settings

SMALL_SEG_CHANNELS = {"unet": "4,8,16", "basic-unet": "4,4,8,8,16", "segresnet": "4"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", sorted(SEGMENTATION_MODELS))
def test_segmentation_forward_shape(name, spatial_dims):
    model = build_model(
        "segmentation",
        name,
        spatial_dims=spatial_dims,
        out_channels=3,
        channels=SMALL_SEG_CHANNELS[name],
    )
    size = 32  # BasicUNet halves the size four times
    x = torch.rand(2, 1, *(size,) * spatial_dims)
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == (2, 3, *(size,) * spatial_dims)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", sorted(CLASSIFICATION_MODELS))
def test_classification_forward_shape(name, spatial_dims):
    model = build_model(
        "classification", name, spatial_dims=spatial_dims, out_channels=3, norm="batch"
    )
    size = 32
    with torch.no_grad():
        y = model.eval()(torch.rand(2, 1, *(size,) * spatial_dims))
    assert y.shape == (2, 3)


@pytest.mark.parametrize(
    ("norm", "module_type"),
    [
        ("batch", torch.nn.BatchNorm2d),
        ("instance", torch.nn.InstanceNorm2d),
        ("group", torch.nn.GroupNorm),
    ],
)
def test_norm_choice_changes_layers(norm, module_type):
    model = build_model("segmentation", "unet", norm=norm, channels="8,16,32")
    kinds = {type(m) for m in model.modules()}
    assert module_type in kinds
    others = {torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d, torch.nn.GroupNorm}
    assert not (others - {module_type}) & kinds


def test_same_seed_same_weights():
    # model_from_settings seeds the network itself: the global torch RNG differs
    settings = resolve_settings({"model.channels": "4,8", "seed": 3})
    torch.manual_seed(1)
    a = model_from_settings(settings)
    torch.manual_seed(2)
    b = model_from_settings(settings)
    for (ka, va), (kb, vb) in zip(
        a.state_dict().items(), b.state_dict().items(), strict=True
    ):
        assert ka == kb
        assert torch.equal(va, vb)
    # and the seed is what decides: another seed gives other weights
    other = model_from_settings(resolve_settings({"model.channels": "4,8", "seed": 4}))
    assert any(
        not torch.equal(va, vo)
        for va, vo in zip(
            a.state_dict().values(), other.state_dict().values(), strict=True
        )
        if va.is_floating_point()
    )


@pytest.mark.parametrize(
    ("task", "name", "message"),
    [
        ("segmentation", "vnet-xl", "valid models: basic-unet, segresnet, unet"),
        ("classification", "unet", "valid models: densenet121, resnet10, resnet18"),
        ("detection", "unet", "valid tasks: classification, segmentation"),
    ],
)
def test_unknown_names_list_valid_ones(task, name, message):
    with pytest.raises(ValueError, match=message):
        build_model(task, name)


def test_unknown_norm_and_dims():
    with pytest.raises(ValueError, match="valid norms: batch, instance, group"):
        build_model("segmentation", "unet", norm="layer")
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        build_model("segmentation", "unet", spatial_dims=1)


def test_parse_channels():
    assert parse_channels("8, 16,32") == (8, 16, 32)
    assert parse_channels("") == ()
    assert parse_channels([4, 8]) == (4, 8)
