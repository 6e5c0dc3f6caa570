"""Write a tiny MONAI bundle: a 2D UNet trained and evaluated on a site folder.

The bundle is what a MONAI user would ship (MONAI's config syntax, no code of
ours): ``configs/train.json`` (network, DiceCE loss, Adam, a ``SupervisedTrainer``
over the site's ``dataset.json`` training list and a ``SupervisedEvaluator`` with
mean Dice over its validation list), ``configs/evaluate.json``,
``configs/inference.json`` (class probabilities of every image in
``<dataset_dir>/imagesTr``, written as NIfTI) and ``configs/metadata.json``.
Its network, loss, optimizer and transforms are those of the built-in ClientApp
(``model.name = "unet"``, ``model.norm = "instance"``), so the two can be timed on
the same network and data (``sim/bundle_vs_builtin.py``).

Usage::

    python sim/tiny_bundle.py my-bundle [--channels 4,8,16] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"


def _preprocessing(keys: list[str], label: bool) -> dict:
    """Load and scale; training drops the metadata, inference keeps the file names."""
    transforms = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "ScaleIntensityd", "keys": "image"},
    ]
    if label:
        transforms.append(
            {"_target_": "AsDiscreted", "keys": "label", "threshold": 0.5}
        )
    keep_meta = not label  # inference: SaveImaged names each output after its image
    transforms.append(
        {"_target_": "EnsureTyped", "keys": keys, "track_meta": keep_meta}
    )
    return {"_target_": "Compose", "transforms": transforms}


def _split(section: str, split: str, batch_size: int, shuffle: bool) -> dict:
    """Data, loader and inferer of ``train`` or ``validate`` (one datalist split)."""
    return {
        "preprocessing": _preprocessing(["image", "label"], label=True),
        "dataset": {
            "_target_": "Dataset",
            "data": "$monai.data.load_decathlon_datalist(@datalist, "
            f"data_list_key='{split}', base_dir=@dataset_dir)",
            "transform": f"@{section}#preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": f"@{section}#dataset",
            "batch_size": batch_size,
            "shuffle": shuffle,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
    }


def bundle_configs(
    channels: Sequence[int] = (4, 8, 16), batch_size: int = 4, lr: float = 0.005
) -> dict[str, dict]:
    """Return the bundle's config files (name -> content) in MONAI's syntax."""
    network = {
        "_target_": "UNet",
        "spatial_dims": "@spatial_dims",
        "in_channels": 1,
        "out_channels": "@num_classes",
        "channels": list(channels),
        "strides": [2] * (len(channels) - 1),
        "num_res_units": 2,
        "norm": ["instance", {"affine": True}],
    }
    train_split = _split("train", "training", batch_size, shuffle=True)
    validate_split = _split("validate", "validation", batch_size, shuffle=False)
    train = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "/data/site",
        "datalist": "$os.path.join(@dataset_dir, 'dataset.json')",
        "device": DEVICE,
        "spatial_dims": 2,
        "num_classes": 2,
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {
            "_target_": "torch.optim.Adam",
            "params": "$@network.parameters()",
            "lr": lr,
        },
        "train": {
            **train_split,
            "handlers": [],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "max_epochs": 1,
                "device": "@device",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "loss_function": "@loss",
                "optimizer": "@optimizer",
                "inferer": "@train#inferer",
                "train_handlers": "@train#handlers",
            },
        },
        "validate": {
            **validate_split,
            "postprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {
                        "_target_": "AsDiscreted",
                        "keys": ["pred", "label"],
                        "argmax": [True, False],
                        "to_onehot": "$[@num_classes, @num_classes]",
                    }
                ],
            },
            "key_metric": {
                "val_mean_dice": {
                    "_target_": "MeanDice",
                    "include_background": False,
                    "output_transform": "$monai.handlers.from_engine("
                    "['pred', 'label'])",
                }
            },
            "handlers": [],
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "inferer": "@validate#inferer",
                "postprocessing": "@validate#postprocessing",
                "key_val_metric": "@validate#key_metric",
                "val_handlers": "@validate#handlers",
            },
        },
        "run": ["$@train#trainer.run()"],
    }
    evaluate = {"run": ["$@validate#evaluator.run()"]}
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "/data/site",
        "output_dir": "$os.path.join(@bundle_root, 'predictions')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, 'imagesTr', '*')))",
        "device": DEVICE,
        "spatial_dims": 2,
        "num_classes": 2,
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "preprocessing": _preprocessing(["image"], label=False),
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "prob",
                    "output_dtype": "$numpy.float32",
                    "resample": False,
                    "separate_folder": False,
                    "print_log": False,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
        },
        "run": ["$@evaluator.run()"],
    }
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/"
        "download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "tiny 2D UNet for federated tests"},
        "monai_version": "1.4.0",
        "name": "tiny_unet_segmentation",
        "task": "2D binary lesion segmentation",
        "description": "A tiny 2D UNet on synthetic site folders (dataset.json).",
        "authors": "flower-medimg",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": [32, 32],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": [32, 32],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "background", "1": "lesion"},
                }
            },
        },
    }
    return {
        "train.json": train,
        "evaluate.json": evaluate,
        "inference.json": inference,
        "metadata.json": metadata,
    }


def write_tiny_bundle(root: str | Path, **kwargs) -> Path:
    """Write the bundle's ``configs/`` under ``root``; return ``root``.

    ``kwargs`` go to :func:`bundle_configs` (``channels``, ``batch_size``, ``lr``).
    """
    root = Path(root)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for name, content in bundle_configs(**kwargs).items():
        (root / "configs" / name).write_text(json.dumps(content, indent=2) + "\n")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to write the bundle into")
    parser.add_argument("--channels", default="4,8,16")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    channels = [int(c) for c in args.channels.split(",")]
    root = write_tiny_bundle(args.root, channels=channels, batch_size=args.batch_size)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
