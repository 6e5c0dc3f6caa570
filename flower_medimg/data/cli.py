"""Command line: write synthetic site folders for a deployment or a demo.

Example::

    python -m flower_medimg.data --task segmentation --num-sites 3 --out sites/

writes ``sites/site-0``, ``sites/site-1``, ``sites/site-2`` (each with images and a
``dataset.json``) and prints their paths, one per line. A SuperNode then points its
``node_config`` at one of them: ``--node-config 'data-dir="sites/site-0"'``. Defaults
match the run-config defaults, so the folders hold the same sites that simulation
generates in memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flower_medimg.core.settings import DEFAULTS
from flower_medimg.core.tasks import TASKS
from flower_medimg.data.site_folder import IMAGE_FORMATS, write_synthetic_sites


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m flower_medimg.data``."""
    parser = argparse.ArgumentParser(
        prog="python -m flower_medimg.data",
        description="Write synthetic multi-site medical images as site folders.",
    )
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--num-sites", type=int, required=True)
    parser.add_argument("--out", required=True, help="parent folder of site-<k>/")
    parser.add_argument("--format", choices=sorted(IMAGE_FORMATS), default="nifti")
    options = [
        ("--seed", "seed", int),
        ("--spatial-dims", "model.spatial-dims", int),
        ("--image-size", "data.image-size", int),
        ("--samples-per-site", "data.samples-per-site", int),
        ("--val-fraction", "data.val-fraction", float),
        ("--quantity-skew", "data.quantity-skew", float),
        ("--scanner-shift", "data.scanner-shift", float),
        ("--label-skew", "data.label-skew", float),
        ("--num-classes", "data.num-classes", int),
    ]
    for flag, key, kind in options:
        default = DEFAULTS[key]
        parser.add_argument(
            flag,
            type=kind,
            default=default,
            help=f"default {default} (run config {key})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the site folders and print their paths.

    Parameters
    ----------
    argv : Sequence[str], optional
        Command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    int
        Exit status (0 on success).
    """
    args = build_parser().parse_args(argv)
    folders = write_synthetic_sites(
        args.out,
        args.task,
        args.num_sites,
        image_format=args.format,
        spatial_dims=args.spatial_dims,
        image_size=args.image_size,
        samples_per_site=args.samples_per_site,
        val_fraction=args.val_fraction,
        quantity_skew=args.quantity_skew,
        scanner_shift=args.scanner_shift,
        label_skew=args.label_skew,
        num_classes=args.num_classes,
        seed=args.seed,
    )
    for folder in folders:
        print(folder)
    return 0
