"""HarmoFL's amplitude normalisation: a layer in front of the network.

Jiang, Wang and Dou, "HarmoFL: Harmonizing Local and Global Drifts in Federated
Learning on Heterogeneous Medical Images", AAAI 2022,
https://arxiv.org/abs/2112.10775.

A centred window of every input image's Fourier amplitude is replaced with a
running amplitude that the sites share through the global model (state_dict key
``amp_norm.running_amp``): the window holds the lowest frequencies, so the images
keep their own phase (structure) and take on a common intensity profile. The layer
is part of the network, so the ServerApp and every ClientApp build it alike
(:func:`flower_medimg.core.models.model_from_settings`); the site-side training
pieces of HarmoFL are in :mod:`flower_medimg.client_apps.methods.harmofl`.

Two deliberate departures from the reference code: the momentum is a real number
(the reference's Cython declares it ``int``, which truncates 0.1 to 0), and 3D
volumes are normalised with ``fftn`` over all spatial axes (our extension; the
paper is 2D only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "AMP_NORM",
    "AmpNorm",
    "amp_norms",
    "amplitude_normalize",
    "attach_amp_norm",
    "update_running_amplitude",
    "window_slices",
]

#: Name of the amplitude-normalisation module; its buffer travels to the server as
#: ``amp_norm.running_amp``.
AMP_NORM = "amp_norm"


def window_slices(
    spatial_shape: Sequence[int], window_ratio: float
) -> tuple[slice, ...]:
    """Return the centred amplitude window (after ``fftshift``) to replace.

    Parameters
    ----------
    spatial_shape : Sequence[int]
        Spatial shape of the images (2 or 3 axes).
    window_ratio : float
        ``L``: the window spans ``[c - b, c + b]`` on every axis, with
        ``b = floor(min(shape) * L)`` and ``c = floor(size / 2)``. ``0`` replaces
        only the DC bin (the reference setting), ``0.5`` the whole spectrum.

    Returns
    -------
    tuple of slice
        One slice per spatial axis.
    """
    if window_ratio < 0:
        raise ValueError(f"HarmoFL window ratio must be >= 0, got {window_ratio}")
    half = math.floor(min(spatial_shape) * window_ratio)
    return tuple(
        slice(max(0, size // 2 - half), min(size, size // 2 + half + 1))
        for size in spatial_shape
    )


def amplitude_normalize(
    images: torch.Tensor, running_amp: torch.Tensor, window_ratio: float = 0.0
) -> torch.Tensor:
    """Give ``images`` the amplitude ``running_amp`` inside the centred window.

    ``X = FFTn(x)`` over the spatial axes; the amplitude ``|X|`` is replaced by
    ``running_amp`` inside :func:`window_slices` (after ``fftshift``), the phase is
    kept, and ``x' = Re(IFFTn(A' e^{i angle(X)}))``.

    Parameters
    ----------
    images : torch.Tensor
        Batch ``(B, C, *spatial)``, 2 or 3 spatial axes.
    running_amp : torch.Tensor
        Shared amplitude ``(C, *spatial)`` in unshifted FFT layout.
    window_ratio : float
        See :func:`window_slices`.

    Returns
    -------
    torch.Tensor
        The normalised batch, same shape and dtype as ``images``.
    """
    dims = tuple(range(2, images.ndim))
    spectrum = torch.fft.fftn(images.float(), dim=dims)
    amplitude, phase = spectrum.abs(), spectrum.angle()
    shifted = torch.fft.fftshift(amplitude, dim=dims)
    target = torch.fft.fftshift(running_amp.float(), dim=tuple(d - 1 for d in dims))
    window = (slice(None), slice(None), *window_slices(images.shape[2:], window_ratio))
    shifted[window] = target[window[1:]].expand_as(shifted[window])
    amplitude = torch.fft.ifftshift(shifted, dim=dims)
    normalized = torch.fft.ifftn(torch.polar(amplitude, phase), dim=dims).real
    return normalized.to(images.dtype)


def update_running_amplitude(
    running_amp: torch.Tensor, batch_amp: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Return ``R`` after one batch: the batch mean if ``R == 0``, else an EMA.

    ``R <- (1 - m) R + m A_batch`` with a real momentum ``m`` (the reference code
    truncates it to an integer).
    """
    if not torch.any(running_amp):
        return batch_amp.clone()
    return (1.0 - momentum) * running_amp + momentum * batch_amp


class AmpNorm(nn.Module):
    """Amplitude normalisation of the network's input (HarmoFL's ``AmpNorm``).

    In training mode and while not ``fixed`` the batch's mean amplitude updates the
    running amplitude (buffer ``running_amp``), which then normalises the batch; in
    eval mode, or once ``fixed``, the stored amplitude is used as it is. While the
    running amplitude is still all zeros (a fresh model, before any training) the
    input passes through unchanged.

    Parameters
    ----------
    channels : int
        Image channels.
    spatial_shape : Sequence[int]
        Spatial size the images must have (the amplitude is stored at it).
    window_ratio : float
        See :func:`window_slices`.
    momentum : float
        EMA momentum of the running amplitude, in ``[0, 1]``.
    """

    def __init__(
        self,
        channels: int,
        spatial_shape: Sequence[int],
        window_ratio: float = 0.0,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"HarmoFL momentum must be in [0, 1], got {momentum}")
        window_slices(spatial_shape, window_ratio)  # validates the ratio
        self.window_ratio = float(window_ratio)
        self.momentum = float(momentum)
        self.fixed = False
        self.register_buffer("running_amp", torch.zeros(channels, *spatial_shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise the amplitude of ``images`` ``(B, C, *spatial)``."""
        if tuple(images.shape[1:]) != tuple(self.running_amp.shape):
            raise ValueError(
                f"HarmoFL's amplitude normalisation needs inputs of shape "
                f"(B, {', '.join(map(str, self.running_amp.shape))}); got "
                f"{tuple(images.shape)}"
            )
        if self.training and not self.fixed:
            with torch.no_grad():
                dims = tuple(range(2, images.ndim))
                batch_amp = torch.fft.fftn(images.float(), dim=dims).abs().mean(0)
                self.running_amp.copy_(
                    update_running_amplitude(self.running_amp, batch_amp, self.momentum)
                )
        if not torch.any(self.running_amp):
            return images
        return amplitude_normalize(images, self.running_amp, self.window_ratio)


def attach_amp_norm(model: nn.Module, amp_norm: AmpNorm) -> nn.Module:
    """Put ``amp_norm`` in front of ``model`` without renaming its parameters.

    The module is registered as ``model.amp_norm`` (so its buffer is the state_dict
    key ``amp_norm.running_amp`` and travels with the shared arrays) and applied to
    the input by a forward pre-hook; every other key keeps its name.
    """
    model.add_module(AMP_NORM, amp_norm)
    model.register_forward_pre_hook(lambda module, args: (amp_norm(args[0]), *args[1:]))
    return model


def amp_norms(model: nn.Module) -> list[AmpNorm]:
    """Return the :class:`AmpNorm` modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, AmpNorm)]
