"""A site's preprocessed images, cached on disk and rebuilt when a file changes.

Reading and transforming a site's images (decompressing NIfTI, resampling,
cropping) is the expensive part of loading its data, and Flower runs every message
of a run in a new process. :class:`CachedSiteDataset` keeps the transformed items
in the site's ``state-dir`` with MONAI's :class:`~monai.data.PersistentDataset`, so
that a site transforms each image once, not once per message.

The cache folder is named by a fingerprint of everything the transformed items
depend on: the datalist's bytes, each referenced file's path, size and
modification time, the task, the transform settings and the names of the
transforms. Editing the datalist, replacing an image or changing ``image-size``
therefore selects a new, empty folder; the folder it replaces (same site folder,
same datalist) is deleted. Each item transformed (a cache miss) is recorded as one
line of ``transformed.jsonl`` in its folder, which is how a site (and the tests)
can tell how often its data were really read.

Cached files are read with ``torch.load(weights_only=True)`` (MONAI's default), so
a file planted in the cache cannot run code; a corrupt one is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import PersistentDataset
from monai.transforms import Compose

__all__ = [
    "CACHE_FOLDER",
    "SOURCE_FILE",
    "TRANSFORMED_LOG",
    "CachedSiteDataset",
    "cache_fingerprint",
    "site_cache_folder",
]

#: Folder in a site's ``state-dir`` that holds the caches.
CACHE_FOLDER = "data-cache"
#: In each cache folder: which site folder and datalist it caches.
SOURCE_FILE = "source.json"
#: In each cache folder: one line per item transformed (a cache miss).
TRANSFORMED_LOG = "transformed.jsonl"
#: Bumped when the meaning of a cached item changes.
_CACHE_FORMAT = 1
_FILE_KEYS = ("image", "label")


def _file_stamp(path: str) -> list[Any]:
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, stat.st_size, stat.st_mtime_ns]


def cache_fingerprint(
    datalist: Path, items: Sequence[dict], transform: Compose, settings: dict
) -> str:
    """Return the name of the cache folder for these items and transforms.

    Parameters
    ----------
    datalist : Path
        The datalist file the items come from (its bytes are hashed).
    items : Sequence[dict]
        The items (``"image"`` and, for segmentation, ``"label"`` file paths).
    transform : Compose
        The transforms applied to every item.
    settings : dict
        The transform settings (task, spatial dims, image size), JSON-serialisable.

    Returns
    -------
    str
        A hex digest; any change of the inputs above changes it.
    """
    files = [
        _file_stamp(item[key])
        for item in items
        for key in _FILE_KEYS
        if isinstance(item.get(key), str)
    ]
    description = {
        "format": _CACHE_FORMAT,
        "datalist": hashlib.sha256(datalist.read_bytes()).hexdigest(),
        "files": files,
        "settings": settings,
        "transforms": [type(t).__qualname__ for t in transform.transforms],
    }
    encoded = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:24]


class CachedSiteDataset(PersistentDataset):
    """A :class:`~monai.data.PersistentDataset` that records its cache misses.

    Parameters
    ----------
    data : Sequence[dict]
        The site's items.
    transform : Compose
        Deterministic transforms (all of them are cached).
    cache_dir : Path
        The fingerprinted cache folder.
    name_errors : callable
        ``name_errors(compute, index)`` runs ``compute()`` and re-raises a file
        error so that it names the file (see
        :class:`flower_medimg.data.datasets.SiteDataset`).
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Compose,
        cache_dir: Path,
        name_errors: Callable[[Callable[[], Any], int], Any],
    ) -> None:
        super().__init__(data=data, transform=transform, cache_dir=cache_dir)
        self._name_errors = name_errors

    def _pre_transform(self, item_transformed: Any) -> Any:
        result = super()._pre_transform(item_transformed)
        record = {key: item_transformed.get(key) for key in _FILE_KEYS}
        with (Path(self.cache_dir) / TRANSFORMED_LOG).open("a") as log:
            log.write(json.dumps({**record, "pid": os.getpid()}, default=str) + "\n")
        return result

    def _transform(self, index: int) -> Any:
        return self._name_errors(
            lambda: super(CachedSiteDataset, self)._transform(index), index
        )


def _prune(root: Path, keep: Path, source: dict) -> None:
    """Delete the other cache folders of the same site folder and datalist."""
    for folder in root.iterdir():
        if folder == keep or not folder.is_dir():
            continue
        try:
            previous = json.loads((folder / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if previous == source:
            shutil.rmtree(folder, ignore_errors=True)


def site_cache_folder(
    state_dir: Path,
    datalist: Path,
    items: Sequence[dict],
    transform: Compose,
    settings: dict,
) -> Path:
    """Return (and create) the cache folder of a site folder's items.

    Parameters
    ----------
    state_dir : Path
        The site's state folder; the cache is ``state_dir/data-cache/<fingerprint>``.
    datalist : Path
        The datalist the items come from.
    items : Sequence[dict]
        All its items (every split; absolute file paths).
    transform : Compose
        Their deterministic transforms.
    settings : dict
        Transform settings that change the output (see :func:`cache_fingerprint`).

    Returns
    -------
    Path
        The folder; a new one replaces (deletes) the site's previous folder for the
        same datalist.
    """
    root = state_dir / CACHE_FOLDER
    folder = root / cache_fingerprint(datalist, items, transform, settings)
    source = {"datalist": str(datalist)}
    if not (folder / SOURCE_FILE).is_file():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        (folder / SOURCE_FILE).write_text(json.dumps(source))
        _prune(root, folder, source)
    return folder
