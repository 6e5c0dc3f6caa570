"""Site folders: one hospital's images on disk with a Decathlon-style datalist.

A site folder holds the images (and segmentation masks) of one site and a
``dataset.json`` that lists them, with paths relative to the folder::

    site-0/
      dataset.json        {"task": "segmentation",
                           "training":   [{"image": "imagesTr/train_0000.nii.gz",
                                           "label": "labelsTr/train_0000.nii.gz"}, ...],
                           "validation": [{"image": ..., "label": ...}, ...]}
      imagesTr/ labelsTr/

For classification ``"label"`` is an integer class index. Images may be NIfTI, DICOM,
PNG or anything else :class:`monai.transforms.LoadImage` reads; :func:`load_datalist`
checks the datalist up front so that a broken site fails with a message naming the
file and key, before any training starts. Every file it lists must lie inside the
site folder once symlinks are followed (no ``../``, no absolute path or symlink out of
it). :func:`write_site_folder` writes folders ``0o700`` and files ``0o600``.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist
from PIL import Image

from flower_medimg.core.tasks import TASKS
from flower_medimg.data.synthetic import synthetic_site

__all__ = [
    "DATALIST_NAME",
    "IMAGE_FORMATS",
    "SPLITS",
    "load_datalist",
    "write_site_folder",
    "write_synthetic_sites",
]

DATALIST_NAME = "dataset.json"
"""Default datalist file name inside a site folder."""

SPLITS = ("training", "validation")
"""The splits every datalist must provide."""

IMAGE_FORMATS = {"nifti": ".nii.gz", "png": ".png"}
"""Formats :func:`write_site_folder` writes, with their file suffix."""


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")


def _write_array(
    path: Path, array: np.ndarray, image_format: str, is_label: bool
) -> None:
    """Write one spatial array (no channel dim) as NIfTI or PNG."""
    if image_format == "nifti":
        data = array.astype(np.uint8 if is_label else np.float32)
        nib.save(nib.Nifti1Image(data, affine=np.eye(4)), str(path))
        return
    if array.ndim != 2:
        raise ValueError(
            f"PNG holds 2D images only; got shape {array.shape} for {path}."
        )
    if is_label:
        data = array.astype(np.uint8)
    else:
        data = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    # MONAI's PILReader uses ITK-style (reversed) indexing, so store the transpose: the
    # array read back through LoadImage is then the array written here.
    Image.fromarray(np.ascontiguousarray(data.T), mode="L").save(path)


def write_site_folder(
    site: dict[str, list[dict]],
    folder: str | Path,
    task: str,
    image_format: str = "nifti",
) -> Path:
    """Write a site's items as image files plus a ``dataset.json`` datalist.

    Parameters
    ----------
    site : dict[str, list[dict]]
        ``{"training": [...], "validation": [...]}`` as returned by
        :func:`~flower_medimg.data.synthetic.synthetic_site`: channel-first
        ``"image"`` arrays and ``"label"`` masks (segmentation) or ints
        (classification).
    folder : str or Path
        Site folder; created if missing, existing files of the same name are
        overwritten.
    task : str
        ``"segmentation"`` or ``"classification"``.
    image_format : str
        ``"nifti"`` (``.nii.gz`` via nibabel, 2D or 3D) or ``"png"`` (8-bit, 2D only;
        image intensities are quantised to 1/255).

    Returns
    -------
    Path
        Path of the written ``dataset.json``. Folders are made ``0o700`` and files
        ``0o600`` (site data are private).
    """
    _check_task(task)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {sorted(IMAGE_FORMATS)}, "
            f"got {image_format!r}."
        )
    for split in SPLITS:
        if not site.get(split):
            raise ValueError(f"site has no {split!r} items; both {SPLITS} are needed.")
    old_umask = os.umask(0o077)  # site data are private: folders 0o700, files 0o600
    try:
        return _write_site_folder(site, Path(folder), task, image_format)
    finally:
        os.umask(old_umask)


def _write_site_folder(
    site: dict[str, list[dict]], folder: Path, task: str, image_format: str
) -> Path:
    """Write the files of :func:`write_site_folder` (under its umask)."""
    suffix = IMAGE_FORMATS[image_format]
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    if task == "segmentation":
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    datalist: dict[str, Any] = {"task": task, "name": folder.name}
    for split, prefix in zip(SPLITS, ("train", "val"), strict=True):
        entries = []
        for index, item in enumerate(site[split]):
            image = np.asarray(item["image"])
            image_rel = f"imagesTr/{prefix}_{index:04d}{suffix}"
            _write_array(folder / image_rel, image[0], image_format, is_label=False)
            if task == "segmentation":
                label: str | int = f"labelsTr/{prefix}_{index:04d}{suffix}"
                mask = np.asarray(item["label"])[0]
                _write_array(folder / label, mask, image_format, is_label=True)
            else:
                label = int(item["label"])
            entries.append({"image": image_rel, "label": label})
        datalist[split] = entries
    spatial_dims = np.asarray(site["training"][0]["image"]).ndim - 1
    datalist["tensorImageSize"] = f"{spatial_dims}D"
    datalist["numTraining"] = len(datalist["training"])
    path = folder / DATALIST_NAME
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    # Folders or files that existed before keep their mode under a umask: set it.
    for sub in ("", "imagesTr", "labelsTr"):
        if (folder / sub).is_dir():
            (folder / sub).chmod(0o700)
    written = [path] + [
        folder / entry[key]
        for split in SPLITS
        for entry in datalist[split]
        for key in ("image", "label")
        if isinstance(entry[key], str)
    ]
    for file in written:
        file.chmod(0o600)
    return path


def write_synthetic_sites(
    out_dir: str | Path,
    task: str,
    num_sites: int,
    *,
    image_format: str = "nifti",
    **synthetic_kwargs: Any,
) -> list[Path]:
    """Generate ``num_sites`` synthetic sites and write each as a site folder.

    Parameters
    ----------
    out_dir : str or Path
        Parent folder; sites go to ``out_dir/site-0``, ``out_dir/site-1``, ...
    task : str
        ``"segmentation"`` or ``"classification"``.
    num_sites : int
        Number of sites.
    image_format : str
        ``"nifti"`` or ``"png"``, see :func:`write_site_folder`.
    **synthetic_kwargs : Any
        Keyword arguments of :func:`~flower_medimg.data.synthetic.synthetic_site`
        (``spatial_dims``, ``image_size``, ``samples_per_site``, ``seed``, ...).

    Returns
    -------
    list[Path]
        The site folders, in site order.
    """
    out_dir = Path(out_dir)
    folders = []
    for site_id in range(num_sites):
        site = synthetic_site(task, site_id, num_sites, **synthetic_kwargs)
        folder = out_dir / f"site-{site_id}"
        write_site_folder(site, folder, task, image_format=image_format)
        folders.append(folder)
    return folders


def _is_class_index(label: Any) -> bool:
    return (
        isinstance(label, numbers.Integral)
        and not isinstance(label, bool)
        and label >= 0
    )


def _check_entries(task: str, split: str, raw: list, path: Path) -> None:
    """Check the entries of one split as written in the datalist."""
    keys = ("image", "label") if task == "segmentation" else ("image",)
    for index, entry in enumerate(raw):
        where = f"item {index} of '{split}' in {path}"
        if not isinstance(entry, dict) or "image" not in entry:
            raise ValueError(f"{where} has no 'image' entry: {entry!r}.")
        if "label" not in entry:
            raise ValueError(f"{where} ({entry['image']}) has no 'label' entry.")
        for key in keys:
            files = entry[key] if isinstance(entry[key], list) else [entry[key]]
            if not files or not all(isinstance(f, str) and f for f in files):
                raise ValueError(
                    f"{where} has {key} {entry[key]!r}; {task} needs a file path "
                    "(or a list of file paths)."
                )
        if task == "classification" and not _is_class_index(entry["label"]):
            raise ValueError(
                f"{where} ({entry['image']}) has label {entry['label']!r}; "
                "classification needs a non-negative integer class index."
            )


def _check_files(
    task: str, split: str, raw: list, items: list[dict], path: Path, data_dir: Path
) -> None:
    """Check that every file of the items exists and lies inside ``data_dir``.

    ``raw`` are the entries as written in the datalist, ``items`` the same entries
    with paths joined to ``data_dir``; ``data_dir`` is resolved. A path is inside
    if it is once symlinks are followed (:meth:`pathlib.Path.resolve`), so ``../``,
    an absolute path elsewhere and a symlink (to a file, or from a folder) out of
    the site folder are refused, a symlink within it is allowed.
    """
    keys = ("image", "label") if task == "segmentation" else ("image",)
    for index, (entry, item) in enumerate(zip(raw, items, strict=True)):
        for key in keys:
            written = entry[key] if isinstance(entry[key], list) else [entry[key]]
            files = item[key] if isinstance(item[key], list) else [item[key]]
            for as_written, file in zip(written, files, strict=True):
                where = f"{key} file of item {index} of '{split}' in {path}"
                try:
                    resolved = Path(file).resolve(strict=True)
                except (FileNotFoundError, NotADirectoryError):
                    resolved = None
                except (OSError, RuntimeError) as err:  # e.g. a symlink loop
                    raise ValueError(
                        f"{where} ({as_written!r}) cannot be resolved: {err}"
                    ) from err
                if not (resolved or Path(file).resolve()).is_relative_to(data_dir):
                    raise ValueError(
                        f"{where} is outside the site folder {data_dir}: "
                        f"{as_written!r} resolves to "
                        f"{resolved or Path(file).resolve()}; a datalist may only "
                        "name files inside its site folder."
                    )
                if resolved is None:
                    raise FileNotFoundError(f"{where} not found: {file}")


def load_datalist(
    data_dir: str | Path, task: str, datalist: str = DATALIST_NAME
) -> dict[str, list[dict]]:
    """Load and check a site's Decathlon-style datalist.

    Paths are resolved against ``data_dir`` with
    :func:`monai.data.load_decathlon_datalist`; every referenced file must exist and,
    with symlinks followed, lie inside ``data_dir``. This is checked before any image
    is opened.

    Parameters
    ----------
    data_dir : str or Path
        The site folder.
    task : str
        ``"segmentation"`` (labels are mask files) or ``"classification"`` (labels are
        integer class indices).
    datalist : str
        Datalist file name (or path) relative to ``data_dir``.

    Returns
    -------
    dict[str, list[dict]]
        ``{"training": [...], "validation": [...]}`` with absolute file paths.

    Raises
    ------
    FileNotFoundError
        If the datalist or a file it references does not exist (the message names it).
    ValueError
        If the datalist is not valid JSON, declares another task, lacks a
        ``"training"``/``"validation"`` list or has an empty one, or an item lacks an
        image, or its label has the wrong type for ``task``, or a file lies outside
        ``data_dir`` (``../``, an absolute path, a symlink out of it) (the message
        names the key, the item, the path as written and the datalist).
    """
    _check_task(task)
    data_dir = Path(data_dir).expanduser().resolve()
    path = data_dir / datalist
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"datalist {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(
            f"datalist {path} must hold a JSON object with {SPLITS} lists."
        )
    declared = content.get("task")
    if declared is not None and declared != task:
        raise ValueError(f"datalist {path} is for task {declared!r}, not {task!r}.")
    result: dict[str, list[dict]] = {}
    for split in SPLITS:
        raw = content.get(split)
        if raw is None:
            raise ValueError(
                f"datalist {path} has no '{split}' key; it needs {SPLITS}."
            )
        if not isinstance(raw, list) or not raw:
            raise ValueError(
                f"'{split}' in datalist {path} must be a non-empty list of items, "
                f"got {raw!r}."
            )
        _check_entries(task, split, raw, path)
        items = load_decathlon_datalist(
            path,
            is_segmentation=task == "segmentation",
            data_list_key=split,
            base_dir=data_dir,
        )
        _check_files(task, split, raw, items, path, data_dir)
        result[split] = items
    return result
