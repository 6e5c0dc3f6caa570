"""The site decides: app approval, site policy, privacy ledger, site audit log.

The checks run in the warm site runtime's parent before any of the app's code
(:class:`flower_medimg.site.admission.Admission`); here they get real Flower
messages, contexts, runs and FABs, and a site folder written to disk.
"""

import hashlib
import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from flower_medimg.core import protocol
from flower_medimg.data.site_folder import write_synthetic_sites
from flower_medimg.site.admission import Admission, AdmissionError
from flower_medimg.site.approvals import (
    APPROVALS_FILE,
    app_hash,
    approve,
    read_approvals,
    revoke,
)
from flower_medimg.site.audit import SITE_AUDIT_LOG, verify_chain
from flower_medimg.site.ledger import (
    LEDGER_FILE,
    LedgerCharge,
    PrivacyLedger,
    compose_epsilon,
)
from flower_medimg.site.policy import PolicyError, load_policy

ROOT = Path(__file__).resolve().parents[1]
APP = {
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "hospital"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
""",
    "tinyapp/__init__.py": "",
    "tinyapp/client.py": "app = None\n",
    "tinyapp/server.py": "app = None\n",
}
NUM_TRAIN = 6  # samples_per_site 8, val_fraction 0.25


def _write_app(folder: Path) -> Path:
    for name, text in APP.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """One synthetic site folder (6 training, 2 validation images of 16²)."""
    out = tmp_path_factory.mktemp("sites")
    (folder,) = write_synthetic_sites(
        out, "segmentation", 1, image_size=16, samples_per_site=8
    )
    return folder


def _fab(content: bytes = b"a FAB") -> Fab:
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def _run(run_id: int) -> Run:
    run = Run.create_empty(run_id)
    run.fab_id = "hospital/study-a"
    return run


def _train(run_id: int, site_dir: Path, state: Path, run_config: dict, **config):
    arrays = ArrayRecord({"w": Array(np.zeros((10, 10), dtype=np.float32))})
    message = Message(
        RecordDict(
            {
                protocol.RECORD_ARRAYS: arrays,
                protocol.RECORD_CONFIG: ConfigRecord(
                    {protocol.CONFIG_SERVER_ROUND: 1, **config}
                ),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(
        run_id=run_id,
        node_id=1,
        node_config={
            protocol.NODE_DATA_DIR: str(site_dir),
            protocol.NODE_STATE_DIR: str(state),
        },
        state=RecordDict(),
        run_config=run_config,
    )
    return message, context


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text("[policy]\n" + text)
    return path


def _audit(state: Path) -> list[dict]:
    lines = (state / SITE_AUDIT_LOG).read_text().splitlines()
    return [json.loads(line) for line in lines]


# ------------------------------------------------------------------ approval
def test_an_unapproved_app_is_refused_naming_its_hash(tmp_path, site_dir):
    fab = _fab()
    admission = Admission(tmp_path)
    message, context = _train(1, site_dir, tmp_path, {})
    refusal = f"FAB hash {fab.hash_str} is not approved"
    with pytest.raises(AdmissionError, match=refusal):
        admission.check(message, context, _run(1), fab)

    approve(tmp_path, fab.hash_str, note="reviewed by the security officer")
    admission.check(message, context, _run(1), fab)

    events = _audit(tmp_path)
    assert [e["event"] for e in events] == ["refuse", "approve", "admit"]
    assert events[0]["fab_hash"] == fab.hash_str
    assert "not approved" in events[0]["reason"]
    assert verify_chain(tmp_path / SITE_AUDIT_LOG)[0] is None


def test_approving_an_app_folder_gives_the_hash_flwr_run_submits(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = _write_app(tmp_path / "app")
    digest, source = app_hash(app)
    assert digest == hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert source.startswith("app folder")

    (app / "tinyapp" / "client.py").write_text("app = 0\n")  # one byte changed
    changed, _ = app_hash(app)
    assert changed != digest

    fab_file = tmp_path / "tinyapp.fab"
    fab_file.write_bytes(build_fab_from_disk(app))
    assert app_hash(fab_file)[0] == changed


def test_the_project_app_is_approved_with_one_command(tmp_path):
    from flower_medimg.cli import main

    state = tmp_path / "state"
    config = tmp_path / "site.toml"
    config.write_text(
        "[site]\nname = 'site-a'\nsuperlink = '127.0.0.1:9092'\ninsecure = true\n"
        f"data-dir = '{tmp_path}'\nstate-dir = '{state}'\n"
    )
    assert main(["site", "approve", "--config", str(config), str(ROOT)]) == 0
    (digest,) = read_approvals(state)
    assert digest == app_hash(ROOT)[0]
    mode = stat.S_IMODE((state / APPROVALS_FILE).stat().st_mode)
    assert mode == 0o600
    assert main(["site", "revoke", "--config", str(config), digest]) == 0
    assert read_approvals(state) == {}
    assert main(["site", "audit", "--config", str(config)]) == 0


def test_a_corrupt_approvals_file_refuses_everything(tmp_path, site_dir):
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    (tmp_path / APPROVALS_FILE).write_text('{"not-a-hash": {}}')
    message, context = _train(1, site_dir, tmp_path, {})
    with pytest.raises(AdmissionError, match=f"approvals file .*{APPROVALS_FILE}"):
        Admission(tmp_path).check(message, context, _run(1), fab)


def test_a_tampered_site_audit_log_is_named_at_its_line(tmp_path):
    for _ in range(3):
        approve(tmp_path, _fab().hash_str)
    path = tmp_path / SITE_AUDIT_LOG
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["note"] = "rewritten"
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    problem, _, good = verify_chain(path)
    assert problem == "line 2: its hash does not match its content" and good == 1
    with pytest.raises(ValueError, match="line 2"):
        approve(tmp_path, _fab().hash_str)


# -------------------------------------------------------------------- policy
@pytest.mark.parametrize(
    ("policy", "run_config", "line", "expected"),
    [
        ("require-dp-sgd = true\n", {}, 2, "without DP-SGD"),
        ("require-secure-aggregation = true\n", {}, 2, "in the clear"),
        (
            "allowed-strategies = ['fedavg']\n",
            {"strategy.name": "fedprox"},
            2,
            "strategy.name = 'fedprox'",
        ),
        ("allowed-tasks = ['classification']\n", {}, 2, "task = 'segmentation'"),
        (
            "private-params = ['norm']\n",
            {"private-params": "none"},
            2,
            "shares ['norm']",
        ),
        ("delta = 1e-6\nmax-update-mib = 0.0001\n", {}, 3, "400 bytes"),
        (f"min-train-samples = {NUM_TRAIN + 1}\n", {}, 2, f"{NUM_TRAIN} training"),
    ],
)
def test_a_policy_violation_names_the_policy_line(
    tmp_path, site_dir, policy, run_config, line, expected
):
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    path = _policy(tmp_path, policy)
    message, context = _train(1, site_dir, tmp_path, run_config)
    with pytest.raises(AdmissionError) as refused:
        Admission(tmp_path, path).check(message, context, _run(1), fab)
    text = str(refused.value)
    assert f"site policy {path} line {line} (" in text and expected in text
    assert _audit(tmp_path)[-1]["event"] == "refuse"


def test_a_run_within_the_policy_is_admitted(tmp_path, site_dir):
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    path = _policy(
        tmp_path,
        "require-dp-sgd = true\nallowed-strategies = ['fedavg']\n"
        f"private-params = ['norm']\nmin-train-samples = {NUM_TRAIN}\n"
        "max-update-mib = 1.0\nrequire-secure-aggregation = true\n",
    )
    run_config = {
        "dp.noise-multiplier": 1.0,
        "private-params": "norm",
        "train.batch-size": 4,
        "secagg.enabled": True,
        "gate.update-norm-factor": 0.0,
        "gate.min-cosine": -1.0,
    }
    message, context = _train(1, site_dir, tmp_path, run_config)
    Admission(tmp_path, path).check(message, context, _run(1), fab)
    (charge,) = PrivacyLedger(tmp_path).charges()
    # 6 images in lots of 4: 2 lots per epoch, q = 1/2, 1 epoch
    assert (charge.noise_multiplier, charge.sample_rate, charge.steps) == (1.0, 0.5, 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max-epsilon = 1.0\n", "unknown key(s) ['max-epsilon']"),
        ("require-dp-sgd = 1\n", "'require-dp-sgd' must be bool"),
        ("max-total-epsilon = -1.0\n", "'max-total-epsilon' must be > 0"),
        ("allowed-tasks = [1]\n", "'allowed-tasks' must be a list"),
        ("delta = 2.0\n", "'delta' must be between 0 and 1"),
    ],
)
def test_a_broken_policy_file_is_named(tmp_path, text, expected):
    path = _policy(tmp_path, text)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_a_broken_policy_refuses_every_message(tmp_path, site_dir):
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    path = _policy(tmp_path, "require-dp-sgd = 'yes'\n")
    message, context = _train(1, site_dir, tmp_path, {})
    with pytest.raises(AdmissionError, match="cannot check this message"):
        Admission(tmp_path, path).check(message, context, _run(1), fab)


# -------------------------------------------------------------------- ledger
SVT_RUN = {
    "privacy.filter": "svt",
    "privacy.share": 0.1,
    "privacy.epsilon": 1.0,
    "privacy.release-epsilon": 0.5,
}


def test_the_ledger_composes_svt_over_two_runs_and_refuses_the_third(
    tmp_path, site_dir
):
    # one SVT round spends eps_thr + eps_query + eps_release = 1.0 + 0.5 = 1.5
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    path = _policy(tmp_path, "max-total-epsilon = 4.0\n")
    admission = Admission(tmp_path, path)
    for run_id in (1, 2):
        admission.check(*_train(run_id, site_dir, tmp_path, SVT_RUN), _run(run_id), fab)
    ledger = PrivacyLedger(tmp_path)
    assert ledger.total_epsilon(1e-5) == pytest.approx(3.0)
    with pytest.raises(AdmissionError) as refused:
        admission.check(*_train(3, site_dir, tmp_path, SVT_RUN), _run(3), fab)
    assert f"site policy {path} line 2 (max-total-epsilon = 4.0)" in str(refused.value)
    assert "ε = 4.500" in str(refused.value)
    summary = ledger.summary(1e-5)
    assert summary["total-epsilon"] == pytest.approx(3.0)
    assert summary["studies"] == [
        {"study": "hospital/study-a", "runs": [1, 2], "rounds": 2, "epsilon": 3.0}
    ]
    assert stat.S_IMODE((tmp_path / LEDGER_FILE).stat().st_mode) == 0o600


def _gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """ε of ``steps`` full-batch Gaussian steps: RDP α T / (2 σ²), Opacus's conversion.

    With q = 1 the subsampled Gaussian is the Gaussian mechanism, whose RDP of order
    α is α / (2 σ²) per step (Mironov 2017, Prop. 7); Opacus converts RDP to
    (ε, δ) with ε = rdp - (log δ + log α) / (α - 1) + log((α - 1) / α) over its
    default orders (Balle et al. 2020, Thm. 21) and takes the minimum.
    """
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    return min(
        steps * a / (2 * sigma**2)
        - (math.log(delta) + math.log(a)) / (a - 1)
        + math.log((a - 1) / a)
        for a in orders
    )


def test_the_ledger_composes_dp_sgd_across_runs_by_one_accountant(tmp_path, site_dir):
    # train.batch-size 8 >= 6 images: one lot per epoch, q = 1; 2 epochs = 2 steps
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    run_config = {"dp.noise-multiplier": 2.0, "train.batch-size": 8}
    budget = (_gaussian_epsilon(2.0, 4, 1e-5) + _gaussian_epsilon(2.0, 6, 1e-5)) / 2
    path = _policy(tmp_path, f"max-total-epsilon = {budget}\n")
    admission = Admission(tmp_path, path)
    for run_id in (1, 2):
        message, context = _train(run_id, site_dir, tmp_path, run_config)
        message.content[protocol.RECORD_CONFIG][protocol.CONFIG_LOCAL_EPOCHS] = 2
        admission.check(message, context, _run(run_id), fab)
    ledger = PrivacyLedger(tmp_path)
    assert [(c.sample_rate, c.steps) for c in ledger.charges()] == [(1.0, 2)] * 2
    # two runs of 2 steps compose to 4 steps, not to twice the ε of 2 steps
    assert ledger.total_epsilon(1e-5) == pytest.approx(
        _gaussian_epsilon(2.0, 4, 1e-5), rel=1e-9
    )
    assert ledger.total_epsilon(1e-5) < 2 * _gaussian_epsilon(2.0, 2, 1e-5)
    message, context = _train(3, site_dir, tmp_path, run_config)
    message.content[protocol.RECORD_CONFIG][protocol.CONFIG_LOCAL_EPOCHS] = 2
    with pytest.raises(AdmissionError, match="max-total-epsilon"):
        admission.check(message, context, _run(3), fab)
    assert len(ledger.charges()) == 2  # the refused round is not charged


def test_composing_the_ledger_equals_the_accountant_on_the_whole_history():
    """One-step RDP per distinct (σ, q), weighted by steps: the accountant's ε."""
    from opacus.accountants import RDPAccountant

    rounds = [(1.0, 0.1, 5), (1.0, 0.1, 7), (2.0, 0.5, 3), (1.0, 0.1, 2)]
    rounds.append((0.8, 0.02, 40))
    charges = [
        LedgerCharge(
            "dp-sgd",
            "s",
            run_id=r % 2,
            server_round=r,
            noise_multiplier=n,
            sample_rate=q,
            steps=t,
        )
        for r, (n, q, t) in enumerate(rounds)
    ]
    accountant = RDPAccountant()
    accountant.history = list(rounds)
    expected = accountant.get_epsilon(1e-5)
    assert compose_epsilon(charges, 1e-5) == pytest.approx(expected, rel=1e-12)
    svt = LedgerCharge("svt", "s", run_id=3, server_round=1, epsilon=0.75)
    assert compose_epsilon([*charges, svt], 1e-5) == pytest.approx(expected + 0.75)
    # twice the rounds is not twice the ε (RDP composes before the conversion)
    assert compose_epsilon(charges * 2, 1e-5) < 2 * expected


def test_max_epsilon_per_run_counts_only_that_run(tmp_path, site_dir):
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    path = _policy(tmp_path, "max-epsilon-per-run = 2.0\n")
    admission = Admission(tmp_path, path)
    admission.check(*_train(1, site_dir, tmp_path, SVT_RUN), _run(1), fab)
    admission.check(*_train(2, site_dir, tmp_path, SVT_RUN), _run(2), fab)
    with pytest.raises(AdmissionError, match="take run 2 to ε = 3.000"):
        admission.check(*_train(2, site_dir, tmp_path, SVT_RUN), _run(2), fab)


def test_revoking_an_app_refuses_its_next_message(tmp_path, site_dir):
    fab = _fab()
    approve(tmp_path, fab.hash_str)
    message, context = _train(1, site_dir, tmp_path, {})
    Admission(tmp_path).check(message, context, _run(1), fab)
    assert revoke(tmp_path, fab.hash_str)
    with pytest.raises(AdmissionError, match="not approved"):
        Admission(tmp_path).check(message, context, _run(1), fab)


def test_the_cli_prints_the_ledger(tmp_path, site_dir, capsys):
    from flower_medimg.cli import main

    fab = _fab()
    approve(tmp_path, fab.hash_str)
    Admission(tmp_path).check(*_train(1, site_dir, tmp_path, SVT_RUN), _run(1), fab)
    config = tmp_path / "site.toml"
    config.write_text(
        "[site]\nname = 'site-a'\nsuperlink = '127.0.0.1:9092'\ninsecure = true\n"
        f"data-dir = '{site_dir}'\nstate-dir = '{tmp_path}'\n"
    )
    capsys.readouterr()
    assert main(["site", "ledger", "--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["total-epsilon"] == pytest.approx(1.5)
