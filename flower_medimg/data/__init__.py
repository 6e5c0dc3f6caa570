"""Data layer: synthetic multi-site images, site folders and MONAI datasets.

Simulation generates every site in memory (:func:`synthetic_site`), deployment reads a
site folder (:func:`load_datalist`); :func:`site_datasets` picks between the two from
the SuperNode's ``node_config`` and returns MONAI datasets either way.
"""

from flower_medimg.data.datasets import (
    SYNTHETIC_KEYS,
    EnsureSpatialDimsd,
    ImageReadError,
    LoadSiteImaged,
    SiteDataset,
    central_test_dataset,
    clear_data_cache,
    make_dataset,
    site_datasets,
    site_transforms,
    synthetic_settings,
)
from flower_medimg.data.site_folder import (
    DATALIST_NAME,
    load_datalist,
    write_site_folder,
    write_synthetic_sites,
)
from flower_medimg.data.synthetic import (
    ScannerProfile,
    apply_scanner_profile,
    scanner_bias_field,
    scanner_profile,
    site_num_samples,
    synthetic_site,
    synthetic_test_set,
)

__all__ = [
    "DATALIST_NAME",
    "SYNTHETIC_KEYS",
    "EnsureSpatialDimsd",
    "ImageReadError",
    "LoadSiteImaged",
    "ScannerProfile",
    "SiteDataset",
    "apply_scanner_profile",
    "central_test_dataset",
    "clear_data_cache",
    "load_datalist",
    "make_dataset",
    "scanner_bias_field",
    "scanner_profile",
    "site_datasets",
    "site_num_samples",
    "site_transforms",
    "synthetic_settings",
    "synthetic_site",
    "synthetic_test_set",
    "write_site_folder",
    "write_synthetic_sites",
]
