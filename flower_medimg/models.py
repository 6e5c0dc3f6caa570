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

import torch
from monai.networks import nets
from opacus.validators import ModuleValidator

__all__ = [
    "CLASSIFICATION_MODELS",
    "NORMS",
    "SEGMENTATION_MODELS",
    "build_model",
    "model_from_config",
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


def model_from_config(config: dict) -> torch.nn.Module:
    """Build the network described by a resolved run config (dotted keys).

    The weights are initialised from the run's ``seed``, so the ServerApp and every
    ClientApp build the same initial model (private parameters start from the same
    values everywhere). With DP-SGD on, layers Opacus cannot handle are replaced
    (BatchNorm becomes GroupNorm) on both sides. Client-side methods that change the
    network (HarmoFL's input amplitude normalisation, ``method.names``) are added
    here too, so the server's global model has the same keys as the sites'.
    """
    # imported here: the client_apps package imports this module
    from flower_medimg.client_apps.methods import ClientMethods

    task = config["task"]
    out_channels = config["data.num-classes"] if task == "classification" else 2
    with torch.random.fork_rng():
        torch.manual_seed(int(config["seed"]))
        model = _build_from_config(config, task, int(out_channels))
    if float(config.get("dp.noise-multiplier", 0)) or float(
        config.get("dp.target-epsilon", 0)
    ):
        model = ModuleValidator.fix(model)
    return ClientMethods.from_config(config).adapt_model(model, config)


def _build_from_config(config: dict, task: str, out_channels: int) -> torch.nn.Module:
    return build_model(
        task,
        config["model.name"],
        spatial_dims=int(config["model.spatial-dims"]),
        out_channels=int(out_channels),
        norm=config["model.norm"],
        channels=config["model.channels"],
    )
