"""Evidence for the privacy and personalisation features, measured in one run.

Three parts (``--part`` runs one of them):

``utility``
    Privacy-utility on synthetic 2D segmentation, 4 sites, Flower's Ray simulation:
    final central Dice with no DP, DP-SGD at σ ∈ {0.5, 1, 2} (and the sites'
    cumulative ε), sparse sharing at ``share`` ∈ {1.0, 0.4, 0.1}; then FLOP
    (``private-params="head"``) vs FedAvg on classification under strong label skew
    (the sites' own validation accuracy: personalised for FLOP).
``mia``
    A loss-threshold membership-inference attack (Yeom et al., 2018) on one site's
    model: AUC of "low loss => member" on its training images (members) vs unseen
    images from the same site (non-members), without and with DP-SGD.
``cost``
    Time of one DP-SGD step vs a non-private step (batch 8, 1×64×64) on MONAI's
    UNet-2D and DenseNet121-2D for each Opacus per-sample-gradient mode, side by
    side; the ratio is what ``dp.grad-sample-mode="auto"`` should minimise.

Usage::

    python sim/privacy_evidence.py --part all
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.simulation import run_simulation
from monai.data import DataLoader
from monai.metrics import compute_roc_auc
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from flower_medimg.client_apps import make_client_app
from flower_medimg.client_apps.training import make_optimizer, train_local
from flower_medimg.core.models import build_model, model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.core.tasks import get_task
from flower_medimg.data import synthetic_site
from flower_medimg.data.datasets import make_dataset
from flower_medimg.server_app import make_server_app

warnings.filterwarnings("ignore")


def simulate(overrides: dict, num_sites: int = 4) -> dict:
    """Run one federation in Flower's Ray simulation; return its metrics summary."""
    config = {"data.num-sites": num_sites, **overrides}
    with tempfile.TemporaryDirectory() as out:
        run_simulation(
            server_app=make_server_app(**config, **{"output-dir": out}),
            client_app=make_client_app(**config),
            num_supernodes=num_sites,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        (run_dir,) = Path(out).iterdir()
        return json.loads((run_dir / "metrics.json").read_text())


def utility(rounds: int) -> None:
    base = {"num-server-rounds": rounds}
    print(f"\n== privacy-utility: 4 sites, 2D segmentation, {rounds} rounds ==")
    print(f"{'setting':32s} {'central Dice':>12s} {'site ε (max)':>13s}")
    settings = [("no DP", {})]
    settings += [(f"DP-SGD σ={s}", {"dp.noise-multiplier": s}) for s in (0.5, 1.0, 2.0)]
    settings += [
        (f"share={s}", {"privacy.filter": "percentile", "privacy.share": s})
        for s in (1.0, 0.4, 0.1)
    ]
    for name, overrides in settings:
        rounds_out = simulate({**base, **overrides})["rounds"]
        dice = rounds_out[-1]["central"]["dice"]
        eps = [c.get("dp-epsilon") for c in rounds_out[-1]["clients-train"]]
        eps_text = f"{max(eps):.2f}" if None not in eps else "-"
        print(f"{name:32s} {dice:12.4f} {eps_text:>13s}")

    print(
        "\n== FLOP vs FedAvg, classification, strong label skew (4 sites, 3 classes) =="
    )
    skew = {
        **base,
        "task": "classification",
        "model.name": "resnet10",
        "model.norm": "batch",
        "model.channels": "8,16,32,64",
        "data.num-classes": 3,
        "data.label-skew": 5.0,
        "data.samples-per-site": 64,
        "data.quantity-skew": 0.0,
    }
    for name, extra in (
        ("FedAvg", {}),
        ("FLOP (private head)", {"private-params": "head"}),
    ):
        rounds_out = simulate({**skew, **extra})["rounds"]
        sites = rounds_out[-1]["clients-evaluate"]
        accuracy = [c["accuracy"] for c in sites]
        loss = [c["eval-loss"] for c in sites]
        print(
            f"{name:24s} site accuracy mean {np.mean(accuracy):.4f} "
            f"worst {min(accuracy):.4f} | site eval loss mean {np.mean(loss):.4f} "
            f"worst {max(loss):.4f}"
        )


def _losses(model: torch.nn.Module, dataset, task) -> np.ndarray:
    """Per-image loss of ``model`` on ``dataset``."""
    loss_fn = task.loss_fn()
    model.eval()
    values = []
    with torch.no_grad():
        for item in DataLoader(dataset, batch_size=1):
            values.append(float(loss_fn(model(item["image"]), item["label"])))
    return np.array(values)


def mia(epochs: int) -> None:
    """Loss-threshold membership inference on one site, without and with DP-SGD."""
    print(f"\n== membership inference (loss threshold), one site, {epochs} epochs ==")
    config = resolve_settings()
    task = get_task("segmentation")
    site = synthetic_site("segmentation", 0, 4, samples_per_site=96, val_fraction=0.5)
    members = make_dataset(site["training"], "segmentation", 2, 64, from_files=False)
    outsiders = make_dataset(
        site["validation"], "segmentation", 2, 64, from_files=False
    )
    for name, sigma in (("no DP", 0.0), ("DP-SGD σ=1", 1.0)):
        torch.manual_seed(0)
        model = model_from_settings(config)
        if sigma:
            model = ModuleValidator.fix(model)
        optimizer = make_optimizer(model, "adam", 0.005)
        loader = DataLoader(members, batch_size=8, shuffle=True)
        epsilon = None
        if sigma:
            engine = PrivacyEngine(accountant="rdp")
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=1.0,
            )  # fmt: skip
        train_local(
            model, loader, task.loss_fn(), optimizer, epochs, torch.device("cpu")
        )
        if sigma:
            epsilon = engine.get_epsilon(1e-5)
        inner = model._module if sigma else model
        member_loss = _losses(inner, members, task)
        outsider_loss = _losses(inner, outsiders, task)
        scores = torch.tensor(np.concatenate([-member_loss, -outsider_loss]))
        labels = torch.tensor([1] * len(member_loss) + [0] * len(outsider_loss))
        auc = float(compute_roc_auc(scores, labels))
        gap = outsider_loss.mean() - member_loss.mean()
        eps_text = f", ε={epsilon:.2f}" if epsilon is not None else ""
        print(
            f"{name:12s} attack AUC {auc:.4f} (0.5 = chance); loss gap "
            f"non-member - member {gap:.4f}{eps_text}"
        )


def _step_time(model, optimizer, batch, loss_fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(batch["image"]), batch["label"]).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def cost(repeats: int) -> None:
    """Seconds per training step, non-private vs each Opacus mode, same batch."""
    print("\n== DP-SGD step cost (batch 8, 1x64x64), ratio to a non-private step ==")
    cases = [
        ("UNet-2D", "segmentation", "unet", (16, 32, 64, 128, 256)),
        ("DenseNet121-2D", "classification", "densenet121", ()),
    ]
    for name, task_name, model_name, channels in cases:
        task = get_task(task_name)
        loss_fn = task.loss_fn()
        x = torch.rand(8, 1, 64, 64)
        if task_name == "segmentation":
            y = (torch.rand(8, 1, 64, 64) > 0.5).float()
        else:
            y = torch.randint(0, 2, (8,))
        batch = {"image": x, "label": y}
        dataset = torch.utils.data.TensorDataset(x, y)

        def fresh(model_name=model_name, task_name=task_name, channels=channels):
            torch.manual_seed(0)
            net = build_model(task_name, model_name, channels=channels, norm="batch")
            return ModuleValidator.fix(net).train()

        model = fresh()
        base = _step_time(model, torch.optim.SGD(model.parameters(), lr=0.01), batch,
                          loss_fn, repeats)  # fmt: skip
        row = [f"{name:15s} non-private {base * 1000:7.1f} ms"]
        for mode in ("hooks", "functorch", "ew", "ghost"):
            model = fresh()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            try:
                engine = PrivacyEngine(accountant="rdp")
                wrapped = engine.make_private(
                    module=model, optimizer=optimizer,
                    data_loader=torch.utils.data.DataLoader(dataset, batch_size=8),
                    noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                    criterion=loss_fn,
                )  # fmt: skip
                if mode == "ghost":
                    dp_model, dp_opt, dp_loss, _ = wrapped
                    seconds = _step_time(dp_model, dp_opt, batch, dp_loss, repeats)
                else:
                    dp_model, dp_opt, _ = wrapped
                    seconds = _step_time(dp_model, dp_opt, batch, loss_fn, repeats)
                row.append(f"{mode} {seconds / base:.2f}x")
            except Exception as error:  # noqa: BLE001 - report the mode as unusable
                row.append(f"{mode} fails ({type(error).__name__})")
        print(" | ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["all", "utility", "mia", "cost"], default="all"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mia-epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.part in ("all", "cost"):
        cost(args.repeats)
    if args.part in ("all", "mia"):
        mia(args.mia_epochs)
    if args.part in ("all", "utility"):
        utility(args.rounds)


if __name__ == "__main__":
    main()
