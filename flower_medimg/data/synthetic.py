"""Synthetic multi-site medical images for simulation and tests.

Every simulated site (hospital) draws its own patients and images them with its own
scanner. A patient is a bright ellipsoid "body" with zero or more circular/spherical
lesions, drawn with :func:`monai.data.synthetic.create_test_image_2d` /
:func:`~monai.data.synthetic.create_test_image_3d`. A scanner is a
:class:`ScannerProfile`: a smooth multiplicative bias field, loss of resolution,
blur, gamma, contrast windowing and noise, built from MONAI intensity transforms. Three
kinds of heterogeneity can be dialled in independently:

* **acquisition (feature) skew** -- ``scanner_shift`` scales how far each site's
  scanner is from the identity profile;
* **quantity skew** -- ``quantity_skew`` makes site sizes geometric rather than equal;
* **label skew** -- ``label_skew`` gives each site its own class mix (classification)
  or lesion-burden mix (segmentation), drawn from a Dirichlet distribution.

All randomness comes from :class:`numpy.random.SeedSequence` streams keyed by
``(seed, site, sample)``, so the same arguments give bit-identical output.

:func:`synthetic_test_set` is the server's own test set, held out from every site:
new patients imaged by each site's scanner, and new patients imaged by a scanner no
site has (a hospital that did not train), so a central score says how the model
does beyond the sites' own data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from monai.data.synthetic import create_test_image_2d, create_test_image_3d
from monai.transforms import AdjustContrast, GaussianSmooth, RandBiasField, Resize
from monai.utils import convert_to_numpy

from flower_medimg.core.tasks import TASKS

__all__ = [
    "ScannerProfile",
    "apply_scanner_profile",
    "scanner_bias_field",
    "scanner_profile",
    "site_num_samples",
    "synthetic_site",
    "synthetic_test_set",
    "TEST_SCANNERS",
]

MIN_SAMPLES_PER_SITE = 4
"""No site is ever smaller than this, whatever the quantity skew."""

SEGMENTATION_BURDENS = 4
"""Segmentation images carry 1..SEGMENTATION_BURDENS lesions (the label-skew "mix")."""

BASE_NOISE_STD = 0.02
"""Gaussian noise every acquisition has, on top of the scanner's own ``noise_std``."""

# Stream tags: each kind of randomness gets its own SeedSequence branch.
_TAG_PROFILE, _TAG_QUANTITY, _TAG_SITE, _TAG_SAMPLE, _TAG_BIAS, _TAG_TEST = range(1, 7)

# Site k takes parameter j at position (offset_j + radical_inverse(k, _BASES[j])) mod 1:
# a shifted Halton sequence, so the first 2**m sites always spread evenly over the gamma
# range (a random draw could give two near-identical sites).
_BASES = (2, 3, 5, 7, 11, 13)


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner turns a patient into an image.

    The default values are the identity profile (a perfect scanner). Effects are applied
    by :func:`apply_scanner_profile` in acquisition order: bias field, resolution loss,
    blur, gamma, contrast, noise; the result is clipped to ``[0, 1]``.

    Parameters
    ----------
    gamma : float
        Gamma of :class:`monai.transforms.AdjustContrast`; ``> 1`` darkens soft
        tissue, ``< 1`` brightens it.
    contrast : float
        Window gain about mid-grey, ``0.5 + (x - 0.5) * contrast`` before clipping;
        ``> 1`` saturates bright lesions, ``< 1`` flattens the image under the noise.
    bias : float
        Strength of the smooth multiplicative bias field: its log spans
        ``[-bias, bias]``.
    noise_std : float
        Standard deviation of the scanner's additive Gaussian noise.
    blur_sigma : float
        Gaussian point-spread function sigma in pixels (0 = sharp).
    downsample : int
        Acquisition resolution divisor; the image is area-downsampled by this factor
        and interpolated back (1 = full resolution).
    """

    gamma: float = 1.0
    contrast: float = 1.0
    bias: float = 0.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    downsample: int = 1


def _rng(*entropy: int) -> np.random.RandomState:
    """Return a legacy generator (MONAI needs RandomState) for one seed stream."""
    return np.random.RandomState(np.random.MT19937(np.random.SeedSequence(entropy)))


def _radical_inverse(index: int, base: int) -> float:
    """Return the van der Corput radical inverse of ``index`` in ``base``."""
    value, scale = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        value += digit * scale
        scale /= base
    return value


def _check_site(site_id: int, num_sites: int, seed: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}.")
    if not 0 <= site_id < num_sites:
        raise ValueError(f"site_id must be in [0, {num_sites}), got {site_id}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")


def scanner_profile(site_id: int, seed: int = 0, shift: float = 1.0) -> ScannerProfile:
    """Return the scanner profile of one site.

    Each parameter walks a shifted Halton sequence over the sites (the shift depends on
    ``seed``), so any few sites get clearly different scanners: among the first four
    sites log-gammas are always at least a quarter of their range apart. At
    ``shift=1`` gamma spans ``[1/3, 3]``, contrast ``[0.8, 1.25]``, bias ``[0, 0.4]``,
    noise std ``[0, 0.08]``, blur sigma ``[0, 1]`` pixel and downsampling ``{1, 2}``;
    ``shift`` scales the log-gamma, log-contrast and the other strengths linearly.

    Parameters
    ----------
    site_id : int
        Site index, ``>= 0``.
    seed : int
        Experiment seed; changes which scanner each site gets.
    shift : float
        Acquisition heterogeneity: ``0`` gives every site the identity profile (IID
        scanners), ``1`` clearly different sites, larger values stronger shifts.

    Returns
    -------
    ScannerProfile
        The site's profile; the same arguments always give the same profile.
    """
    if site_id < 0:
        raise ValueError(f"site_id must be >= 0, got {site_id}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}.")
    if shift == 0:
        return ScannerProfile()
    offsets = _rng(seed, _TAG_PROFILE).uniform(size=len(_BASES))
    halton = np.array([_radical_inverse(site_id, base) for base in _BASES])
    pos = (offsets + halton) % 1.0
    return ScannerProfile(
        gamma=float(3.0 ** (shift * (2.0 * pos[0] - 1.0))),
        contrast=float(1.25 ** (shift * (2.0 * pos[1] - 1.0))),
        bias=float(shift * 0.4 * pos[2]),
        noise_std=float(shift * 0.08 * pos[3]),
        blur_sigma=float(shift * 1.0 * pos[4]),
        downsample=1 + int(shift * 2.0 * pos[5]),
    )


def site_num_samples(
    site_id: int,
    num_sites: int,
    samples_per_site: int,
    quantity_skew: float = 0.0,
    seed: int = 0,
) -> int:
    """Return how many images a site holds under quantity skew.

    Site sizes are geometric in a seed-dependent ranking of the sites: the site of rank
    ``r`` gets a share proportional to ``exp(-quantity_skew * r)`` of the
    ``num_sites * samples_per_site`` images (e.g. ``quantity_skew=log(2)`` with 4 sites
    gives 8/16/32/64 for ``samples_per_site=30``).

    Parameters
    ----------
    site_id : int
        Site index in ``[0, num_sites)``.
    num_sites : int
        Number of sites in the federation.
    samples_per_site : int
        Mean number of images per site.
    quantity_skew : float
        ``0`` gives every site ``samples_per_site`` images; larger is more unequal.
    seed : int
        Experiment seed; changes which site is largest.

    Returns
    -------
    int
        Number of images of the site, never fewer than 4.
    """
    _check_site(site_id, num_sites, seed)
    if samples_per_site < 1:
        raise ValueError(f"samples_per_site must be >= 1, got {samples_per_site}.")
    if quantity_skew < 0:
        raise ValueError(f"quantity_skew must be >= 0, got {quantity_skew}.")
    ranks = _rng(seed, _TAG_QUANTITY, num_sites).permutation(num_sites)
    weights = np.exp(-quantity_skew * ranks)
    share = num_sites * samples_per_site * weights[site_id] / weights.sum()
    return max(MIN_SAMPLES_PER_SITE, round(float(share)))


def scanner_bias_field(
    spatial_shape: Sequence[int], bias: float, random_state: np.random.RandomState
) -> np.ndarray:
    """Return a smooth multiplicative bias field whose log spans ``[-bias, bias]``.

    The polynomial field comes from :class:`monai.transforms.RandBiasField`; it is
    centred and rescaled so that ``bias`` is its strength independent of the draw.

    Parameters
    ----------
    spatial_shape : Sequence[int]
        Spatial shape of the images (2 or 3 dims).
    bias : float
        Field strength (0 gives a field of ones).
    random_state : numpy.random.RandomState
        Generator for the polynomial coefficients.

    Returns
    -------
    numpy.ndarray
        float32 field of shape ``(1, *spatial_shape)``.
    """
    ones = np.ones((1, *spatial_shape), dtype=np.float32)
    if bias <= 0:
        return ones
    field = RandBiasField(degree=3, coeff_range=(-1.0, 1.0), prob=1.0)
    field.set_random_state(state=random_state)
    log_field = np.log(convert_to_numpy(field(ones), dtype=np.float64))
    log_field -= log_field.mean()
    log_field /= max(float(np.abs(log_field).max()), 1e-8)
    return np.exp(bias * log_field).astype(np.float32)


def _optics(
    images: np.ndarray, profile: ScannerProfile, bias_field: np.ndarray | None
) -> np.ndarray:
    """Apply the linear, channel-wise part of a scanner: bias, resolution, blur.

    ``images`` is ``(C, *spatial)``; channels are independent, so a whole site can go
    through in one call with one image per channel.
    """
    img = np.asarray(images, dtype=np.float32)
    spatial = img.shape[1:]
    if bias_field is not None:
        img = img * bias_field
    factor = min(int(profile.downsample), max(1, min(spatial) // 4))
    if factor > 1:
        low = [max(1, s // factor) for s in spatial]
        linear = "bilinear" if len(spatial) == 2 else "trilinear"
        img = Resize(low, mode="area")(img)
        img = Resize(spatial, mode=linear, align_corners=False)(img)
    if profile.blur_sigma > 0:
        img = GaussianSmooth(sigma=profile.blur_sigma)(img)
    return np.clip(convert_to_numpy(img, dtype=np.float32), 0.0, None)


def _detector(
    image: np.ndarray,
    profile: ScannerProfile,
    random_state: np.random.RandomState,
    base_noise_std: float,
) -> np.ndarray:
    """Apply the per-image part of a scanner: gamma, contrast, noise, clipping."""
    img = image
    if profile.gamma != 1.0:
        gamma = AdjustContrast(gamma=profile.gamma)
        img = np.stack([convert_to_numpy(gamma(channel[None]))[0] for channel in img])
    if profile.contrast != 1.0:
        img = 0.5 + (img - 0.5) * np.float32(profile.contrast)
    noise_std = float(np.hypot(base_noise_std, profile.noise_std))
    if noise_std > 0:
        noise = random_state.normal(0.0, noise_std, size=img.shape)
        img = img + noise.astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def apply_scanner_profile(
    image: np.ndarray,
    profile: ScannerProfile,
    random_state: np.random.RandomState,
    bias_field: np.ndarray | None = None,
    base_noise_std: float = BASE_NOISE_STD,
) -> np.ndarray:
    """Image a channel-first array in ``[0, 1]`` with one scanner.

    Every channel is treated as a separate image (gamma uses each channel's range).

    Parameters
    ----------
    image : numpy.ndarray
        Patient array of shape ``(C, *spatial)``, values in ``[0, 1]``.
    profile : ScannerProfile
        The scanner.
    random_state : numpy.random.RandomState
        Generator for the noise.
    bias_field : numpy.ndarray, optional
        Multiplicative field from :func:`scanner_bias_field` (the same for every image
        of a site); ``None`` means no bias field.
    base_noise_std : float
        Gaussian noise added for every scanner, the identity included.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape, clipped to ``[0, 1]``.
    """
    img = _optics(image, profile, bias_field)
    return _detector(img, profile, random_state, base_noise_std)


def _radius_range(image_size: int) -> tuple[int, int]:
    """Lesion radii ``[low, high)`` that fit ``create_test_image_*``'s constraints."""
    low = max(1, image_size // 32)
    return low, max(low + 1, image_size // 5)


def _size_bins(image_size: int, num_classes: int) -> list[tuple[int, int]]:
    """Split the lesion radii into ``num_classes - 1`` bins, one per lesion class."""
    low, high = _radius_range(image_size)
    edges = np.round(np.linspace(low, high, num_classes)).astype(int)
    if np.any(np.diff(edges) < 1):
        raise ValueError(
            f"image_size {image_size} is too small for {num_classes} lesion-size "
            f"classes (radii {low}..{high - 1}); use a larger image_size or fewer "
            "classes."
        )
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _body(shape: Sequence[int], rs: np.random.RandomState) -> np.ndarray:
    """Return a soft-tissue ellipsoid of random size, position and brightness."""
    shape = tuple(shape)
    centre = [s / 2.0 + rs.uniform(-0.05, 0.05) * s for s in shape]
    axes = [rs.uniform(0.30, 0.45) * s for s in shape]
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    radius2 = sum(
        ((g + 0.5 - c) / a) ** 2 for g, c, a in zip(grids, centre, axes, strict=True)
    )
    return np.where(radius2 <= 1.0, rs.uniform(0.2, 0.35), 0.0)


def _lesions(
    shape: Sequence[int], num: int, radii: tuple[int, int], rs: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``num`` lesions (intensity in ``(0, 1]``, binary mask) via MONAI."""
    kwargs = {"num_objs": num, "rad_min": radii[0], "rad_max": radii[1]}
    kwargs.update(noise_max=0.0, num_seg_classes=1, random_state=rs)
    if len(shape) == 2:
        image, mask = create_test_image_2d(*shape, **kwargs)
    else:
        image, mask = create_test_image_3d(*shape, **kwargs)
    return image, mask > 0


def _patient(
    task: str,
    category: int,
    shape: Sequence[int],
    num_classes: int,
    rs: np.random.RandomState,
) -> tuple[np.ndarray, np.ndarray | int]:
    """Draw one patient: image in ``[0, 1]`` and its label.

    For segmentation ``category`` is the lesion burden (``category + 1`` lesions) and
    the label is the lesion mask. For classification class 0 has no lesion and class
    ``k >= 1`` one lesion whose radius lies in the ``k``-th size bin.
    """
    image = _body(shape, rs)
    if task == "segmentation":
        lesion, mask = _lesions(shape, category + 1, _radius_range(shape[0]), rs)
    elif category == 0:
        return image, 0
    else:
        radii = _size_bins(shape[0], num_classes)[category - 1]
        lesion, mask = _lesions(shape, 1, radii, rs)
    image = np.where(mask, lesion * rs.uniform(0.8, 1.0), image)
    if task == "segmentation":
        return image, mask.astype(np.uint8)
    return image, int(category)


def _site_plan(
    task: str,
    site_id: int,
    num_sites: int,
    samples_per_site: int,
    val_fraction: float,
    quantity_skew: float,
    label_skew: float,
    num_classes: int,
    seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return each sample's category and the sample indices of each split."""
    n = site_num_samples(site_id, num_sites, samples_per_site, quantity_skew, seed)
    rs = _rng(seed, _TAG_SITE, site_id)
    k = num_classes if task == "classification" else SEGMENTATION_BURDENS
    if label_skew > 0:
        mix = rs.dirichlet(np.full(k, 1.0 / label_skew))
        categories = rs.choice(k, size=n, p=mix)
    else:
        categories = np.arange(n) % k
        rs.shuffle(categories)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = rs.permutation(n)
    splits = {"training": np.sort(order[n_val:]), "validation": np.sort(order[:n_val])}
    return categories, splits


def _check_args(
    task: str,
    spatial_dims: int,
    image_size: int,
    val_fraction: float,
    scanner_shift: float,
    label_skew: float,
    num_classes: int,
) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if scanner_shift < 0:
        raise ValueError(f"scanner_shift must be >= 0, got {scanner_shift}.")
    if label_skew < 0:
        raise ValueError(f"label_skew must be >= 0, got {label_skew}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if task == "classification":
        _size_bins(image_size, num_classes)


def _generate_site(
    task: str,
    site_id: int,
    num_sites: int,
    splits: Sequence[str],
    spatial_dims: int,
    image_size: int,
    samples_per_site: int,
    val_fraction: float,
    quantity_skew: float,
    scanner_shift: float,
    label_skew: float,
    num_classes: int,
    seed: int,
) -> dict[str, list[dict]]:
    _check_args(
        task,
        spatial_dims,
        image_size,
        val_fraction,
        scanner_shift,
        label_skew,
        num_classes,
    )
    categories, indices = _site_plan(
        task,
        site_id,
        num_sites,
        samples_per_site,
        val_fraction,
        quantity_skew,
        label_skew,
        num_classes,
        seed,
    )
    shape = (image_size,) * spatial_dims
    return {
        split: _acquire(
            task,
            site_id,
            categories,
            indices[split],
            shape,
            num_classes,
            scanner_shift,
            seed,
            _TAG_SAMPLE,
        )
        for split in splits
    }


# pylint: disable-next=too-many-arguments
def _acquire(
    task: str,
    scanner_id: int,
    categories: np.ndarray,
    indices: np.ndarray,
    shape: tuple[int, ...],
    num_classes: int,
    scanner_shift: float,
    seed: int,
    tag: int,
) -> list[dict]:
    """Draw the patients ``indices`` and image them with scanner ``scanner_id``."""
    profile = scanner_profile(scanner_id, seed, scanner_shift)
    field = scanner_bias_field(shape, profile.bias, _rng(seed, _TAG_BIAS, scanner_id))
    rss, patients, labels = [], [], []
    for index in indices:
        rs = _rng(seed, tag, scanner_id, int(index))
        patient, label = _patient(task, int(categories[index]), shape, num_classes, rs)
        rss.append(rs)
        patients.append(patient)
        labels.append(label[None] if isinstance(label, np.ndarray) else label)
    # the channel-wise optics run once for the whole split (one image per channel)
    acquired = _optics(np.stack(patients), profile, field)
    return [
        {"image": _detector(image[None], profile, rs, BASE_NOISE_STD), "label": label}
        for image, rs, label in zip(acquired, rss, labels, strict=True)
    ]


def synthetic_site(
    task: str,
    site_id: int,
    num_sites: int,
    *,
    spatial_dims: int = 2,
    image_size: int = 64,
    samples_per_site: int = 32,
    val_fraction: float = 0.25,
    quantity_skew: float = 0.0,
    scanner_shift: float = 1.0,
    label_skew: float = 0.0,
    num_classes: int = 2,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Generate one simulated site's training and validation data in memory.

    Parameters
    ----------
    task : str
        ``"segmentation"`` (label: lesion mask) or ``"classification"`` (label: class
        0 = no lesion, class ``k >= 1`` = one lesion in the ``k``-th size bin; with
        ``num_classes=2`` lesion absent/present).
    site_id : int
        Site index in ``[0, num_sites)``.
    num_sites : int
        Number of sites (needed for quantity skew).
    spatial_dims : int
        2 for images, 3 for volumes.
    image_size : int
        Side length of the square/cubic images, ``>= 8``.
    samples_per_site : int
        Mean number of images per site (see :func:`site_num_samples`).
    val_fraction : float
        Share of the site's images held out for validation (at least one image in
        each split).
    quantity_skew : float
        Inequality of site sizes, ``0`` = equal.
    scanner_shift : float
        Acquisition heterogeneity, see :func:`scanner_profile`; ``0`` = IID scanners.
    label_skew : float
        ``0`` gives balanced classes (lesion burdens 1..4 for segmentation); ``> 0``
        draws the site's mix from a Dirichlet with concentration ``1 / label_skew``.
    num_classes : int
        Number of classes for classification (ignored for segmentation).
    seed : int
        Experiment seed.

    Returns
    -------
    dict[str, list[dict]]
        ``{"training": [...], "validation": [...]}``; each item has ``"image"``, a
        float32 array ``(1, *spatial)`` in ``[0, 1]``, and ``"label"``, a uint8 mask
        ``(1, *spatial)`` in ``{0, 1}`` (segmentation) or an ``int`` class.
    """
    return _generate_site(
        task,
        site_id,
        num_sites,
        ("training", "validation"),
        spatial_dims=spatial_dims,
        image_size=image_size,
        samples_per_site=samples_per_site,
        val_fraction=val_fraction,
        quantity_skew=quantity_skew,
        scanner_shift=scanner_shift,
        label_skew=label_skew,
        num_classes=num_classes,
        seed=seed,
    )


#: The scanners of :func:`synthetic_test_set`.
TEST_SCANNERS = ("seen", "unseen")


def synthetic_test_set(
    task: str,
    num_sites: int,
    *,
    scanners: str = "seen",
    spatial_dims: int = 2,
    image_size: int = 64,
    samples_per_site: int = 32,
    val_fraction: float = 0.25,
    quantity_skew: float = 0.0,
    scanner_shift: float = 1.0,
    label_skew: float = 0.0,
    num_classes: int = 2,
    seed: int = 0,
) -> list[dict]:
    """Return a server-held test set of patients no site has.

    ``round(samples_per_site * val_fraction)`` (at least 2) new patients per site,
    with a balanced class (lesion-burden) mix whatever the label skew, imaged either
    by each site's scanner (``scanners="seen"``) or, as many in all, by the scanner
    of site ``num_sites``, which no site has (``"unseen"``: a hospital that did not
    train). The patients' random streams are apart from every site's, so none of
    them is in any site's training or validation split.

    Parameters
    ----------
    task : str
        ``"segmentation"`` or ``"classification"``.
    num_sites : int
        Number of sites.
    scanners : {"seen", "unseen"}
        Whose scanners image the test patients.
    spatial_dims, image_size, samples_per_site, val_fraction : int, int, int, float
        As in :func:`synthetic_site`.
    quantity_skew, scanner_shift, label_skew : float
        As in :func:`synthetic_site` (quantity and label skew do not change the
        test set).
    num_classes, seed : int
        As in :func:`synthetic_site`.

    Returns
    -------
    list[dict]
        Items as in :func:`synthetic_site`, site by site for ``"seen"``.
    """
    del quantity_skew, label_skew  # a test set is balanced and the same per site
    _check_args(
        task, spatial_dims, image_size, val_fraction, scanner_shift, 0.0, num_classes
    )
    _check_site(0, num_sites, seed)
    if scanners not in TEST_SCANNERS:
        raise ValueError(f"scanners must be one of {TEST_SCANNERS}, got {scanners!r}.")
    per_site = max(2, round(samples_per_site * val_fraction))
    k = num_classes if task == "classification" else SEGMENTATION_BURDENS
    shape = (image_size,) * spatial_dims
    plan = (
        [(site_id, per_site) for site_id in range(num_sites)]
        if scanners == "seen"
        else [(num_sites, per_site * num_sites)]
    )
    items: list[dict] = []
    for scanner_id, n in plan:
        categories = np.arange(n) % k
        _rng(seed, _TAG_TEST, scanner_id).shuffle(categories)
        items += _acquire(
            task,
            scanner_id,
            categories,
            np.arange(n),
            shape,
            num_classes,
            scanner_shift,
            seed,
            _TAG_TEST,
        )
    return items
