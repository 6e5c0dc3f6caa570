"""MONAI datasets for one site, from files (deployment) or synthetic (simulation).

:func:`site_datasets` is the one entry point a ClientApp needs: it reads the site's
``node_config`` and returns ``(train, validation)`` datasets whose items are
``{"image": float32 tensor (1, *spatial), "label": ...}`` -- a float mask
``(1, *spatial)`` in ``{0, 1}`` for segmentation, a long scalar for classification --
whether the images come from a site folder or are generated in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Resized,
    ScaleIntensityd,
)
from PIL import Image

from flower_medimg.core import protocol
from flower_medimg.core.settings import Settings
from flower_medimg.core.tasks import TASKS
from flower_medimg.data.cache import CachedSiteDataset, site_cache_folder
from flower_medimg.data.site_folder import DATALIST_NAME, SPLITS, load_datalist
from flower_medimg.data.synthetic import synthetic_site, synthetic_test_set

__all__ = [
    "MAX_VOXELS",
    "SYNTHETIC_KEYS",
    "CheckSegmentationLabeld",
    "EnsureSpatialDimsd",
    "ImageReadError",
    "LoadSiteImaged",
    "SiteDataset",
    "central_test_dataset",
    "clear_data_cache",
    "make_dataset",
    "header_shape",
    "site_datasets",
    "site_transforms",
    "synthetic_settings",
]

#: Run-config key -> keyword of :func:`~flower_medimg.data.synthetic.synthetic_site`.
SYNTHETIC_KEYS: dict[str, str] = {
    "seed": "seed",
    "model.spatial-dims": "spatial_dims",
    "data.image-size": "image_size",
    "data.samples-per-site": "samples_per_site",
    "data.val-fraction": "val_fraction",
    "data.quantity-skew": "quantity_skew",
    "data.scanner-shift": "scanner_shift",
    "data.label-skew": "label_skew",
    "data.num-classes": "num_classes",
}

_CACHE_SIZE = 16

MAX_VOXELS = 2**25
"""Default of the most voxels (all dims, channels included) an image or label file
may hold; a site sets its own with ``node_config["max-voxels"]``.

:class:`LoadSiteImaged` reads the shape from the file header (NIfTI, ``.npy``, PNG and
other PIL formats, DICOM) before any pixel data and refuses a larger file, so that a
decompression bomb or a header that lies about its size fails fast instead of
filling memory. ``2**25`` is e.g. 320^3 or 5792^2 voxels.
"""

_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(RuntimeError):
    """An image or label file that cannot be read, or does not fit the task.

    Parameters
    ----------
    message : str
        What went wrong; names the file.
    path : str, optional
        The offending file.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def header_shape(path: str | Path) -> tuple[int, ...] | None:
    """Return the array shape a file's header declares, reading no pixel data.

    Parameters
    ----------
    path : str or Path
        An image file: NIfTI (``.nii``, ``.nii.gz``, Analyze ``.hdr``/``.img``),
        ``.npy``, PNG/JPEG/BMP/TIFF (via PIL) or DICOM (``.dcm``).

    Returns
    -------
    tuple[int, ...] or None
        The declared shape (PIL images: ``(width, height, bands)``), or ``None`` for
        a format whose header is not inspected here (e.g. a DICOM series folder).

    Raises
    ------
    Exception
        Whatever the header reader raises for a corrupt, truncated or empty file.
    """
    name = str(path).lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
    if name.endswith(".npy"):
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(file)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(file)
        return tuple(int(n) for n in shape)
    if name.endswith(_PIL_SUFFIXES):
        with Image.open(path) as image:  # reads the header only, no pixel data
            return (*image.size, len(image.getbands()))
    if name.endswith(_DICOM_SUFFIXES):
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return (
            int(getattr(ds, "NumberOfFrames", 1) or 1),
            int(ds.Rows),
            int(ds.Columns),
            int(getattr(ds, "SamplesPerPixel", 1) or 1),
        )
    return None


def _check_voxels(key: str, path: str, max_voxels: int) -> None:
    """Raise :class:`ImageReadError` if ``path``'s header declares > ``max_voxels``."""
    try:
        shape = header_shape(path)
    except Exception as err:
        raise ImageReadError(
            f"cannot read the header of {key} file {path}: {type(err).__name__}: {err}",
            path=path,
        ) from err
    if shape is not None and int(np.prod(shape, dtype=np.float64)) > max_voxels:
        raise ImageReadError(
            f"{key} file {path} declares shape {shape} in its header: "
            f"{int(np.prod(shape, dtype=np.float64))} voxels, over the cap of "
            f"{max_voxels} (node_config '{protocol.NODE_MAX_VOXELS}', default "
            f"{MAX_VOXELS}); not read.",
            path=path,
        )


class LoadSiteImaged(MapTransform):
    """:class:`monai.transforms.LoadImaged` that names the file a reader fails on.

    MONAI picks the reader from the file suffix (NIfTI via nibabel, DICOM via pydicom,
    PNG/JPEG via PIL, ...). Before reading, the shape declared in the file header
    (see :func:`header_shape`) must hold at most ``max_voxels`` voxels. Any
    reader error is re-raised as :class:`ImageReadError` whose message names the key
    and the file.

    Parameters
    ----------
    keys : KeysCollection
        Keys of the file paths to load.
    max_voxels : int
        The cap on voxels per file (default :data:`MAX_VOXELS`).
    allow_missing_keys : bool
        Don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        max_voxels: int = MAX_VOXELS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_voxels = max_voxels
        self._loaders = {key: LoadImaged(key, image_only=True) for key in self.keys}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load the image of every key, naming the file on failure."""
        d = dict(data)
        for key in self.key_iterator(d):
            files = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            for file in files:
                _check_voxels(key, str(file), self.max_voxels)
            try:
                d = self._loaders[key](d)
            except Exception as err:
                raise ImageReadError(
                    f"cannot read {key} file {d[key]}: {type(err).__name__}: {err}",
                    path=str(d[key]),
                ) from err
        return d


class EnsureSpatialDimsd(MapTransform):
    """Bring channel-first loaded images to one channel and ``spatial_dims`` dims.

    Applied after :class:`monai.transforms.EnsureChannelFirstd`, it fixes what real
    files bring: trailing singleton dims (a 2D slice stored as ``(H, W, 1)``),
    channel-last colour that the reader did not flag (RGB DICOM arrives as
    ``(1, H, W, 3)``), and several channels (RGB PNG). Images become the mean of their
    colour channels, labels keep their first channel. A file whose spatial
    dimensionality still differs raises :class:`ImageReadError` naming it.

    Parameters
    ----------
    keys : KeysCollection
        Keys to fix.
    spatial_dims : int
        Expected number of spatial dims (2 or 3).
    label_keys : KeysCollection
        Keys among ``keys`` that are label maps (first channel kept, never averaged).
    allow_missing_keys : bool
        Don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        label_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else label_keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Fix the channel and spatial dims of every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim - 1 > self.spatial_dims and img.shape[-1] == 1:
                img = img.reshape(img.shape[:-1])
            if (
                self.spatial_dims == 2
                and img.ndim == 4
                and img.shape[0] == 1
                and img.shape[-1] in (3, 4)
            ):
                img = torch.movedim(img[0], -1, 0)
            if img.ndim - 1 != self.spatial_dims:
                name = getattr(img, "meta", {}).get("filename_or_obj", "?")
                raise ImageReadError(
                    f"{key} file {name} has shape {tuple(img.shape)} after loading; "
                    f"expected one channel and {self.spatial_dims} spatial dims.",
                    path=str(name),
                )
            if img.shape[0] > 1:
                if key in self.label_keys:
                    img = img[:1]
                else:
                    img = img[:3].mean(dim=0, keepdim=True)
            d[key] = img
        return d


class CheckSegmentationLabeld(MapTransform):
    """Check a loaded segmentation label against its image; never fix it silently.

    Applied after :class:`EnsureSpatialDimsd` (both keys channel-first, one
    channel), before any resizing: the label's spatial shape must equal the
    image's, and every label value must be 0 or 1 (no NaN). Otherwise
    :class:`ImageReadError` names the label file and what is wrong.

    Parameters
    ----------
    label_key : str
        Key of the label map.
    image_key : str
        Key of the image it belongs to.
    """

    def __init__(self, label_key: str = "label", image_key: str = "image") -> None:
        super().__init__((label_key,))
        self.label_key = label_key
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Raise if the label does not fit the image or is not binary."""
        d = dict(data)
        label, image = d[self.label_key], d[self.image_key]
        name = str(getattr(label, "meta", {}).get("filename_or_obj", "?"))
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise ImageReadError(
                f"{self.label_key} file {name} has spatial shape "
                f"{tuple(label.shape[1:])}, but its image has "
                f"{tuple(image.shape[1:])}; a label must match its image.",
                path=name,
            )
        values = np.asarray(label.detach().cpu() if torch.is_tensor(label) else label)
        if not ((values == 0) | (values == 1)).all():
            bad = np.unique(values[(values != 0) & (values != 1)])
            raise ImageReadError(
                f"{self.label_key} file {name} holds values other than 0 and 1 "
                f"(e.g. {bad[:5].tolist()}); a segmentation label must be binary.",
                path=name,
            )
        return d


class SiteDataset(Dataset):
    """A :class:`monai.data.Dataset` whose file errors name the file.

    MONAI's ``Compose`` wraps every transform error in ``RuntimeError("applying
    transform ...")``; this dataset re-raises the :class:`ImageReadError` underneath
    it, so that the top-level message names the unreadable file.
    """

    def _transform(self, index: int) -> Any:
        return naming_file_errors(
            lambda: super(SiteDataset, self)._transform(index), index
        )


def naming_file_errors(compute: Callable[[], Any], index: int) -> Any:
    """Run ``compute()``; re-raise an :class:`ImageReadError` buried in its error.

    MONAI's ``Compose`` wraps every transform error in ``RuntimeError("applying
    transform ...")``; the error raised here names the item and the file instead.
    """
    try:
        return compute()
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ImageReadError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise ImageReadError(f"item {index}: {cause}", path=cause.path) from (
            cause.__cause__
        )


def _check(task: str, spatial_dims: int) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")


def site_transforms(
    task: str,
    spatial_dims: int,
    image_size: int,
    *,
    from_files: bool,
    max_voxels: int = MAX_VOXELS,
) -> Compose:
    """Return the dictionary transforms that turn a site's items into tensors.

    From files: :class:`LoadSiteImaged` (image, and label for segmentation),
    ``EnsureChannelFirstd``, :class:`EnsureSpatialDimsd`,
    :class:`CheckSegmentationLabeld` (segmentation: a label must have its image's
    shape and values in ``{0, 1}``; nothing is fixed silently), ``ScaleIntensityd``
    (image min-max to ``[0, 1]``), ``Resized`` to ``(image_size,) * spatial_dims``
    (labels nearest-neighbour). In memory the images already have the right size, so
    only the intensity and type steps run, and the (generated) segmentation labels
    are binarised (foreground = label ``>= 0.5``). ``EnsureTyped`` returns plain
    tensors.

    Parameters
    ----------
    task : str
        ``"segmentation"`` or ``"classification"``.
    spatial_dims : int
        2 or 3.
    image_size : int
        Side length of the output images.
    from_files : bool
        Whether ``"image"`` (and a segmentation ``"label"``) are file paths.
    max_voxels : int
        Files whose header declares more voxels are refused unread.

    Returns
    -------
    monai.transforms.Compose
        Output items: ``"image"`` float32 ``(1, *spatial)``; ``"label"`` float32
        ``(1, *spatial)`` in ``{0, 1}`` (segmentation) or a long scalar.
    """
    _check(task, spatial_dims)
    segmentation = task == "segmentation"
    file_keys = ("image", "label") if segmentation else ("image",)
    transforms: list = []
    if from_files:
        linear = "bilinear" if spatial_dims == 2 else "trilinear"
        transforms += [
            LoadSiteImaged(file_keys, max_voxels),
            EnsureChannelFirstd(file_keys),
            EnsureSpatialDimsd(file_keys, spatial_dims, label_keys="label"),
            *([CheckSegmentationLabeld()] if segmentation else []),
            ScaleIntensityd("image"),
            Resized(
                file_keys,
                spatial_size=(image_size,) * spatial_dims,
                mode=(linear, "nearest")[: len(file_keys)],
                anti_aliasing=(True, False)[: len(file_keys)],
            ),
        ]
    else:
        transforms.append(ScaleIntensityd("image"))
        if segmentation:
            transforms.append(AsDiscreted("label", threshold=0.5))
    label_dtype = torch.float32 if segmentation else torch.long
    transforms.append(
        EnsureTyped(
            ("image", "label"), dtype=(torch.float32, label_dtype), track_meta=False
        )
    )
    return Compose(transforms)


def make_dataset(
    items: list[dict],
    task: str,
    spatial_dims: int,
    image_size: int,
    *,
    from_files: bool,
    max_voxels: int = MAX_VOXELS,
) -> Dataset:
    """Wrap a site's items in a :class:`SiteDataset` with :func:`site_transforms`.

    Parameters
    ----------
    items : list[dict]
        ``{"image": ..., "label": ...}`` items: file paths (``from_files=True``, e.g.
        from :func:`~flower_medimg.data.site_folder.load_datalist`) or arrays (from
        :func:`~flower_medimg.data.synthetic.synthetic_site`).
    task : str
        ``"segmentation"`` or ``"classification"``.
    spatial_dims : int
        2 or 3.
    image_size : int
        Side length of the output images.
    from_files : bool
        Whether the items hold file paths.
    max_voxels : int
        The cap on voxels per file (see :class:`LoadSiteImaged`).

    Returns
    -------
    monai.data.Dataset
        The dataset; reading an unreadable file raises :class:`ImageReadError` naming
        it.
    """
    transform = site_transforms(
        task, spatial_dims, image_size, from_files=from_files, max_voxels=max_voxels
    )
    return SiteDataset(data=items, transform=transform)


def synthetic_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return the :func:`~flower_medimg.data.synthetic.synthetic_site` keywords.

    Parameters
    ----------
    settings : Mapping[str, Any]
        The run's settings (:class:`~flower_medimg.core.settings.Settings`).

    Returns
    -------
    dict[str, Any]
        ``seed``, ``spatial_dims``, ``image_size``, ``samples_per_site``,
        ``val_fraction``, ``quantity_skew``, ``scanner_shift``, ``label_skew`` and
        ``num_classes``.
    """
    return {name: settings[key] for key, name in SYNTHETIC_KEYS.items()}


@lru_cache(maxsize=_CACHE_SIZE)
def _synthetic_datasets(
    task: str,
    partition_id: int,
    num_partitions: int,
    settings: tuple[tuple[str, Any], ...],
) -> tuple[Dataset, Dataset]:
    kwargs = dict(settings)
    site = synthetic_site(task, partition_id, num_partitions, **kwargs)
    dims, size = kwargs["spatial_dims"], kwargs["image_size"]
    train, val = (
        make_dataset(site[split], task, dims, size, from_files=False)
        for split in SPLITS
    )
    return train, val


@lru_cache(maxsize=_CACHE_SIZE)
def _folder_datasets(
    task: str,
    data_dir: str,
    datalist: str,
    spatial_dims: int,
    image_size: int,
    modified_ns: int,
    state_dir: str | None,
    max_voxels: int,
) -> tuple[Dataset, Dataset]:
    del modified_ns  # part of the cache key only: an edited datalist is re-read
    items = load_datalist(data_dir, task, datalist)
    if state_dir is None:
        train, val = (
            make_dataset(
                items[split],
                task,
                spatial_dims,
                image_size,
                from_files=True,
                max_voxels=max_voxels,
            )
            for split in SPLITS
        )
        return train, val
    transform = site_transforms(
        task, spatial_dims, image_size, from_files=True, max_voxels=max_voxels
    )
    folder = site_cache_folder(
        Path(state_dir),
        Path(data_dir) / datalist,
        [item for split in SPLITS for item in items[split]],
        transform,
        {
            "task": task,
            "spatial-dims": spatial_dims,
            "image-size": image_size,
            "max-voxels": max_voxels,
        },
    )
    train, val = (
        CachedSiteDataset(items[split], transform, folder, naming_file_errors)
        for split in SPLITS
    )
    return train, val


@lru_cache(maxsize=_CACHE_SIZE)
def _central_dataset(
    task: str, num_sites: int, scanners: str, settings: tuple[tuple[str, Any], ...]
) -> Dataset:
    kwargs = dict(settings)
    items = synthetic_test_set(task, num_sites, scanners=scanners, **kwargs)
    dims, size = kwargs["spatial_dims"], kwargs["image_size"]
    return make_dataset(items, task, dims, size, from_files=False)


def clear_data_cache() -> None:
    """Forget the datasets cached by :func:`site_datasets` and friends."""
    _synthetic_datasets.cache_clear()
    _folder_datasets.cache_clear()
    _central_dataset.cache_clear()


def _max_voxels(node_config: Mapping[str, Any]) -> int:
    """Return the site's cap on voxels per file, checked."""
    value = node_config.get(protocol.NODE_MAX_VOXELS, MAX_VOXELS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"node_config '{protocol.NODE_MAX_VOXELS}' must be a positive integer "
            f"(voxels per image file), got {value!r}"
        )
    return value


def site_datasets(
    settings: Settings, node_config: Mapping[str, Any]
) -> tuple[Dataset, Dataset]:
    """Return a site's ``(train, validation)`` datasets: the ClientApp's entry point.

    * Deployment / real data: ``node_config["data-dir"]`` is a site folder;
      its datalist (``node_config["datalist"]``, default ``dataset.json``) is read by
      :func:`~flower_medimg.data.site_folder.load_datalist` and images are loaded from
      the files and resized to ``data.image-size``; ``node_config["max-voxels"]``
      (default :data:`MAX_VOXELS`) caps the voxels per file, read from its header.
    * Simulation: ``node_config["partition-id"]`` and ``["num-partitions"]`` pick a
      synthetic site, generated in memory from the settings (see
      :func:`synthetic_settings`).

    Results are cached in-process by their arguments, so later rounds in the same
    process reuse the data instead of regenerating or re-reading the datalist (an
    edited datalist file is picked up). A site with a ``state-dir`` also keeps its
    transformed images there (:mod:`flower_medimg.data.cache`), so that a new
    process, as Flower starts for every message in deployment, reads them
    transformed instead of from the raw files.

    Parameters
    ----------
    settings : Settings
        The run's settings (task, image size, synthetic-site settings).
    node_config : Mapping[str, Any]
        The SuperNode's node config.

    Returns
    -------
    tuple[monai.data.Dataset, monai.data.Dataset]
        Training and validation datasets.

    Raises
    ------
    ValueError
        If ``node_config`` has neither ``data-dir`` nor ``partition-id`` and
        ``num-partitions``, or its ``max-voxels`` is not a positive integer.
    """
    task = settings["task"]
    synthetic = synthetic_settings(settings)
    if protocol.NODE_DATA_DIR in node_config:
        data_dir = Path(str(node_config[protocol.NODE_DATA_DIR])).expanduser().resolve()
        datalist = str(node_config.get(protocol.NODE_DATALIST, DATALIST_NAME))
        json_path = data_dir / datalist
        modified = json_path.stat().st_mtime_ns if json_path.is_file() else -1
        state_dir = node_config.get(protocol.NODE_STATE_DIR)
        return _folder_datasets(
            task,
            str(data_dir),
            datalist,
            synthetic["spatial_dims"],
            synthetic["image_size"],
            modified,
            None if state_dir is None else str(state_dir),
            _max_voxels(node_config),
        )
    if protocol.NODE_PARTITION_ID in node_config:
        if protocol.NODE_NUM_PARTITIONS not in node_config:
            raise ValueError(
                "node_config has 'partition-id' but no 'num-partitions'; a simulated "
                "site needs both."
            )
        return _synthetic_datasets(
            task,
            int(node_config[protocol.NODE_PARTITION_ID]),
            int(node_config[protocol.NODE_NUM_PARTITIONS]),
            tuple(sorted(synthetic.items())),
        )
    raise ValueError(
        "node_config must name the site's data: 'data-dir' (a site folder with "
        f"{DATALIST_NAME}, for deployment) or 'partition-id' and 'num-partitions' "
        f"(simulation); got keys {sorted(node_config)}."
    )


def central_test_dataset(settings: Settings, scanners: str = "seen") -> Dataset:
    """Return the server-held synthetic test set, held out from every site.

    Parameters
    ----------
    settings : Settings
        The run's settings (``data.num-sites`` and the synthetic-site settings).
    scanners : {"seen", "unseen"}
        New patients imaged by the sites' scanners, or by a scanner no site has.

    Returns
    -------
    monai.data.Dataset
        In-memory dataset of :func:`~flower_medimg.data.synthetic.synthetic_test_set`.
    """
    return _central_dataset(
        settings["task"],
        settings["data.num-sites"],
        scanners,
        tuple(sorted(synthetic_settings(settings).items())),
    )
