"""Evidence for issue 7: one small simulation showing the whole lifecycle.

Runs 3 synthetic sites (scanner-shift 1) with the statistics phase, a stop rule
(target dice 0.4, or patience 2), the registry keeping every round, cross-site
validation and the audit log; then the registry and audit CLI.
Usage: python sim/lifecycle_demo.py OUT_DIR
"""

import subprocess
import sys
from pathlib import Path

from flwr.simulation import run_simulation

from flower_medimg.client_apps import make_client_app
from flower_medimg.server_app import make_server_app

out = Path(sys.argv[1]).resolve()
config = {
    "num-server-rounds": 6,
    "model.channels": "4,8,16",
    "data.image-size": 32,
    "data.samples-per-site": 12,
    "data.num-sites": 3,
    "train.batch-size": 4,
    "output-dir": str(out / "outputs"),
    "registry.path": str(out / "registry"),
    "registry.keep": "all",
    "strategy.name": "fedadam",
    "strategy.eta": 0.01,
    "stop.metric": "central/dice",
    "stop.target": 0.4,
    "stop.patience": 2,
    "stop.min-delta": 0.01,
}
run_simulation(
    server_app=make_server_app(**config),
    client_app=make_client_app(**config),
    num_supernodes=3,
    backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
)
(run_dir,) = (out / "outputs").iterdir()
cli = [sys.executable, "-m", "flower_medimg.cli"]


def show(*args):
    print("$ flower-medimg " + " ".join(args), flush=True)
    subprocess.run([*cli, *args], check=False)


print("\n== statistics.md ==\n" + (run_dir / "statistics.md").read_text())
print("== cross_site.md ==\n" + (run_dir / "cross_site.md").read_text())
show("registry", "--path", str(out / "registry"), "list")
show("registry", "--path", str(out / "registry"), "compare", "1", "2")
show("registry", "--path", str(out / "registry"), "export", "1", str(out / "export"))
show("audit", "verify", str(run_dir / "audit.jsonl"))
lines = (run_dir / "audit.jsonl").read_bytes().splitlines(keepends=True)
lines[4] = lines[4].replace(b'"accepted":true', b'"accepted":false', 1)
tampered = out / "audit-tampered.jsonl"
tampered.write_bytes(b"".join(lines))
show("audit", "verify", str(tampered))
