"""MONAI network factory for segmentation and classification.

Every entry builds a MONAI network from a name, the number of spatial dimensions
(2 or 3) and the normalisation layer, so that the ServerApp and every ClientApp
build exactly the same architecture (and therefore the same state_dict keys) from
the run config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import reduce
from typing import TYPE_CHECKING

import torch
from monai.networks import nets

from .amp_norm import AmpNorm, attach_amp_norm
from .quiet_imports import root_logger_kept

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "CLASSIFICATION_MODELS",
    "NORMS",
    "SEGMENTATION_MODELS",
    "build_model",
    "model_from_settings",
    "parse_channels",
]

NORMS = ("batch", "instance", "group")

#: ReLU without ``inplace``: Opacus's per-sample gradients (DP-SGD) need it.
_RELU = ("relu", {"inplace": False})


def _norm_spec(norm: str, channels: Sequence[int]) -> str | tuple:
    """Translate a norm name into MONAI's ``norm`` argument for these channel widths."""
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    if norm == "group":
        groups = min(8, reduce(math.gcd, channels))
        return ("group", {"num_groups": groups})
    if norm == "instance":
        return ("instance", {"affine": True})
    return "batch"


def _unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    channels: Sequence[int],
) -> torch.nn.Module:
    channels = tuple(channels) or (16, 32, 64, 128)
    return nets.UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
        # the last residual unit normalises the output channels too
        norm=_norm_spec(norm, (*channels, out_channels)),
    )


def _basic_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    channels: Sequence[int],
) -> torch.nn.Module:
    features = tuple(channels) or (16, 16, 32, 64, 128)
    if len(features) != 5:
        raise ValueError(
            f"basic-unet needs 5 channel widths (got {len(features)}: {features})"
        )
    return nets.BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=(*features, features[0]),
        norm=_norm_spec(norm, features),
    )


def _segresnet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    channels: Sequence[int],
) -> torch.nn.Module:
    init_filters = channels[0] if channels else 8
    return nets.SegResNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        init_filters=init_filters,
        act=_RELU,
        norm=_norm_spec(norm, [init_filters]),
    )


def _densenet121(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    norm: str,
    channels: Sequence[int],
) -> torch.nn.Module:
    del channels  # DenseNet121 has a fixed width
    return nets.DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        act=_RELU,
        norm=_norm_spec(norm, [32, 64]),
    )


def _resnet(layers: list[int]) -> Callable[..., torch.nn.Module]:
    def build(
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str,
        channels: Sequence[int],
    ) -> torch.nn.Module:
        inplanes = list(channels) if channels else [64, 128, 256, 512]
        if len(inplanes) != 4:
            raise ValueError(f"resnet needs 4 channel widths (got {inplanes})")
        return nets.ResNet(
            block="basic",
            layers=layers,
            block_inplanes=inplanes,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=out_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            act=_RELU,
            norm=_norm_spec(norm, inplanes),
        )

    return build


SEGMENTATION_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "unet": _unet,
    "basic-unet": _basic_unet,
    "segresnet": _segresnet,
}
CLASSIFICATION_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "densenet121": _densenet121,
    "resnet10": _resnet([1, 1, 1, 1]),
    "resnet18": _resnet([2, 2, 2, 2]),
}


def parse_channels(channels: str | Sequence[int]) -> tuple[int, ...]:
    """Parse channel widths given as ``"8,16,32"`` (run config) or a sequence."""
    if isinstance(channels, str):
        return tuple(int(c) for c in channels.split(",") if c.strip())
    return tuple(int(c) for c in channels)


def build_model(
    task: str,
    name: str,
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 2,
    norm: str = "instance",
    channels: str | Sequence[int] = (),
) -> torch.nn.Module:
    """Build a MONAI network.

    Parameters
    ----------
    task : str
        ``"segmentation"`` or ``"classification"``.
    name : str
        Network name; see ``SEGMENTATION_MODELS`` and ``CLASSIFICATION_MODELS``.
    spatial_dims : int
        2 for images, 3 for volumes.
    in_channels : int
        Number of image channels.
    out_channels : int
        Number of segmentation classes (background included) or image classes.
    norm : str
        ``"batch"``, ``"instance"`` or ``"group"``.
    channels : str or sequence of int
        Channel widths of the network's stages; empty for the network's default.

    Returns
    -------
    torch.nn.Module
        The freshly initialised network.
    """
    registry = {
        "segmentation": SEGMENTATION_MODELS,
        "classification": CLASSIFICATION_MODELS,
    }
    if task not in registry:
        raise ValueError(
            f"Unknown task {task!r}; valid tasks: {', '.join(sorted(registry))}"
        )
    models = registry[task]
    if name not in models:
        raise ValueError(
            f"Unknown {task} model {name!r}; valid models: {', '.join(sorted(models))}"
        )
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return models[name](
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        norm=norm,
        channels=parse_channels(channels),
    )


def model_from_settings(settings: Settings) -> torch.nn.Module:
    """Build the network that a run's settings describe.

    The weights are initialised from the run's ``seed``, so the ServerApp and every
    ClientApp build the same initial model (private parameters start from the same
    values everywhere). With DP-SGD on, layers Opacus cannot handle are replaced
    (BatchNorm becomes GroupNorm) on both sides. HarmoFL (``method.names``) puts
    its amplitude normalisation in front of the network on both sides too, so the
    server's global model has the same keys as the sites'.
    """
    with torch.random.fork_rng():
        torch.manual_seed(settings["seed"])
        model = build_model(
            settings["task"],
            settings["model.name"],
            spatial_dims=settings["model.spatial-dims"],
            out_channels=settings.num_classes,
            norm=settings["model.norm"],
            channels=settings["model.channels"],
        )
    if settings.dp_sgd:
        with root_logger_kept():
            from opacus.validators import ModuleValidator
        model = ModuleValidator.fix(model)
    if "harmofl" in settings.client_methods:
        spatial = (settings["data.image-size"],) * settings["model.spatial-dims"]
        amp_norm = AmpNorm(
            1,
            spatial,
            settings["method.harmofl-window"],
            settings["method.harmofl-momentum"],
        )
        model = attach_amp_norm(model, amp_norm)
    return model
