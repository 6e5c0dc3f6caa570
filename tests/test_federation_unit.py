"""The federation launcher's parts, without starting Flower: TLS, keys, processes."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key

from flower_medimg.cli import main
from flower_medimg.core.private_files import write_private
from flower_medimg.federation import Federation, Site, supernode_argv
from flower_medimg.federation.certificates import OPERATOR_NAME, write_tls_files
from flower_medimg.federation.control_plane import (
    CONTROL_PREFIX,
    FLEET_PREFIX,
    ProxyTls,
    find_nginx,
    front_config,
    gateway_config,
    start_proxy,
)
from flower_medimg.federation.flwr_cli import (
    read_connection,
    remove_connection,
    write_connection,
)
from flower_medimg.federation.keys import write_node_keys
from flower_medimg.federation.launcher import runtime_env
from flower_medimg.site.processes import (
    ProcessRecord,
    free_port,
    is_running,
    start_process,
    stop_process,
    wait_for_port,
)


def test_tls_files_chain_and_names(tmp_path):
    files = write_tls_files(tmp_path, hosts=["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "superlink.example.org",
        "localhost",
    }
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for secret in (files.ca_key, files.server_key):
        assert secret.stat().st_mode & 0o077 == 0


def test_node_keys_are_what_flower_reads(tmp_path):
    keys = write_node_keys(tmp_path, "site-a")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert keys.public_key.read_text().strip().endswith("site-a")
    assert try_load_public_key(keys.public_key)  # what `flwr supernode register` does
    assert keys.private_key.stat().st_mode & 0o077 == 0


def test_flwr_connection_added_and_removed(tmp_path):
    home = tmp_path / "home"
    ca = tmp_path / "ca.crt"
    write_connection("fed", "127.0.0.1:1234", ca, home)
    text = (home / "config.toml").read_text()
    assert "[superlink.fed]" in text and "[superlink.local]" in text
    assert read_connection("fed", home) == {
        "address": "127.0.0.1:1234",
        "root-certificates": str(ca.resolve()),
    }
    assert not remove_connection("fed", "127.0.0.1:9999", home)  # changed: kept
    assert remove_connection("fed", "127.0.0.1:1234", home)
    assert read_connection("fed", home) is None
    assert read_connection("local", home) is not None


def _sleeper(tmp_path: Path, seconds: int = 60) -> ProcessRecord:
    record, _ = start_process(
        "sleeper",
        [sys.executable, "-c", f"import time; time.sleep({seconds})"],
        tmp_path / "logs" / "sleeper.log",
        env={},
    )
    return record


def test_stop_process_checks_the_command_line(tmp_path):
    record = _sleeper(tmp_path)
    assert is_running(record)
    other = ProcessRecord("sleeper", record.pid, [sys.executable, "-c", "x"], "")
    assert not is_running(other)
    assert stop_process(other) == "pid reused"  # not signalled
    assert is_running(record)
    assert stop_process(record, grace=5) == "terminated"
    assert not is_running(record)
    assert stop_process(record) == "not running"


def test_stop_process_kills_after_grace(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code += "print('ready', flush=True); time.sleep(60)"
    log = tmp_path / "stubborn.log"
    record, _ = start_process("stubborn", [sys.executable, "-c", code], log, env={})
    deadline = time.monotonic() + 20
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stop_process(record, grace=0.5) == "killed"
    assert not is_running(record)


def test_wait_for_port_names_the_log_of_a_dead_process(tmp_path):
    record, _ = start_process(
        "quitter", [sys.executable, "-c", "pass"], tmp_path / "q.log", env={}
    )
    with pytest.raises(RuntimeError, match="quitter exited.*q.log"):
        wait_for_port("127.0.0.1", free_port(), 20, record)


def _federation(tmp_path: Path) -> Federation:
    return Federation(
        folder=str(tmp_path),
        connection="fed",
        address="127.0.0.1:4000",
        flwr_home=str(tmp_path / "home"),
        tls={"ca_cert": "/x/ca.crt"},
        task="segmentation",
    )


def test_supernode_command_line(tmp_path):
    fed = _federation(tmp_path)
    site = Site(
        "site-0", "/data/my site", "/state/site-0", "/k/s.key", "/k/s.pub", 4001
    )
    argv = supernode_argv(fed, site)
    assert argv[argv.index("--superlink") + 1] == "127.0.0.1:4000"
    assert argv[argv.index("--root-certificates") + 1] == "/x/ca.crt"
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "/k/s.key"
    node_config = argv[argv.index("--node-config") + 1]
    assert node_config == 'data-dir="/data/my site" state-dir="/state/site-0"'
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "4001"
    assert "--insecure" not in argv
    plain = supernode_argv(fed, site, insecure=True)
    assert "--insecure" in plain and "--root-certificates" not in plain


def test_federation_state_round_trip(tmp_path):
    fed = _federation(tmp_path)
    fed.sites.append(Site("site-0", "/d", "/s", "/k", "/p", 4001, node_id=7))
    fed.processes.append(ProcessRecord("superlink", 42, ["a", "b"], "/l"))
    fed.save()
    again = Federation.load(tmp_path)
    assert again == fed
    assert again.site("site-0").node_id == 7
    assert again.process("superlink").pid == 42
    with pytest.raises(FileNotFoundError, match="No federation"):
        Federation.load(tmp_path / "elsewhere")


def test_runtime_env_uses_this_environment(tmp_path):
    env = runtime_env(tmp_path / "h", base={"PATH": "/bin"})
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path / "h")
    assert env["PATH"] == "/bin"


def test_cli_certs_keygen_and_data(tmp_path, capsys):
    assert main(["federation", "certs", "--out", str(tmp_path / "tls")]) == 0
    assert json.loads(capsys.readouterr().out)["ca_cert"].endswith("ca.crt")
    args = ["federation", "keygen", "--out", str(tmp_path / "k"), "--name", "site-a"]
    assert main(args) == 0
    assert (tmp_path / "k" / "site-a.pub").exists()
    data = ["data", "--task", "classification", "--num-sites", "1"]
    data += ["--out", str(tmp_path / "sites"), "--samples-per-site", "4"]
    data += ["--image-size", "16"]
    assert main(data) == 0
    assert (tmp_path / "sites" / "site-0" / "dataset.json").exists()


def test_cli_status_without_federation(tmp_path, capsys):
    assert main(["federation", "status", "--dir", str(tmp_path)]) == 1
    assert "No federation" in capsys.readouterr().err


def test_operator_certificate_is_for_client_authentication_only(tmp_path):
    files = write_tls_files(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    operator = x509.load_pem_x509_certificate(files.operator_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    operator.verify_directly_issued_by(ca)
    usage = operator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert OPERATOR_NAME in operator.subject.rfc4514_string()
    assert stat.S_IMODE(files.operator_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_private_file_is_never_readable_by_others(tmp_path, monkeypatch):
    """0600 from the first byte, whatever the umask; a replaced file stays 0600."""
    opened: list[int] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append(mode)
        return real_open(path, flags, mode, *args, **kwargs)

    old = os.umask(0)
    try:
        target = tmp_path / "secret.key"
        target.write_bytes(b"old")
        target.chmod(0o644)
        monkeypatch.setattr(os, "open", spy)
        write_private(target, b"new key")
    finally:
        os.umask(old)
    assert opened == [0o600]
    assert target.read_bytes() == b"new key"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no partial left


def test_node_key_written_private(tmp_path):
    old = os.umask(0)
    try:
        keys = write_node_keys(tmp_path / "keys", "site-0")
    finally:
        os.umask(old)
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700


def test_front_config_forwards_only_the_fleet_api_without_a_certificate(tmp_path):
    """nginx accepts the generated configuration; its rules are the promised ones."""
    files = write_tls_files(tmp_path / "tls")
    tls = ProxyTls(str(files.ca_cert), str(files.server_cert), str(files.server_key))
    config = front_config(tmp_path / "front", "127.0.0.1:9", "127.0.0.1:8", tls)
    fleet = config.index(f"location {FLEET_PREFIX}")
    control = config.index(f"location {CONTROL_PREFIX}")
    fallback = config.index("location / {")
    assert "ssl_client_certificate" in config and "ssl_verify_client optional" in config
    assert "$ssl_client_verify != SUCCESS" in config[control:fallback]
    assert "$ssl_client_verify" not in config[fleet:control]
    assert "return 403" in config[fallback:]
    assert "proxy_pass" not in config[fallback:]
    gateway = gateway_config(tmp_path / "gw", "127.0.0.1:7", "127.0.0.1:9", tls)
    assert f"location {FLEET_PREFIX}" not in gateway
    for text in (config, gateway):
        conf = tmp_path / "check.conf"
        conf.write_text(text)
        (tmp_path / "front" / "tmp").mkdir(parents=True, exist_ok=True)
        (tmp_path / "gw" / "tmp").mkdir(parents=True, exist_ok=True)
        checked = subprocess.run(
            [find_nginx(), "-e", str(tmp_path / "e.log"), "-t", "-c", str(conf)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr


def test_a_refused_proxy_config_names_the_file(tmp_path):
    with pytest.raises(RuntimeError, match=r"nginx refused .*nginx\.conf \(proxy\)"):
        start_proxy(
            "proxy", tmp_path / "p", "events {}\nhttp { bogus; }\n", "127.0.0.1:9", {}
        )


def test_missing_nginx_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install nginx"):
        find_nginx()


def test_cli_prints_a_gateway_config_nginx_accepts(tmp_path, capsys):
    write_tls_files(tmp_path / "tls")
    args = ["federation", "proxy-config", "gateway", "--tls", str(tmp_path / "tls")]
    args += ["--listen", "127.0.0.1:7", "--upstream", "127.0.0.1:8000"]
    args += ["--folder", str(tmp_path / "gw"), "--server-name", "superlink.example.org"]
    assert main(args) == 0
    config = capsys.readouterr().out
    assert str(tmp_path / "tls" / "operator.crt") in config
    upstream = config[config.index("upstream ") :]
    assert "server 127.0.0.1:8000;" in upstream and "keepalive" in upstream
    assert 'proxy_set_header Connection "";' in config  # keep-alive to it
    assert "proxy_ssl_name superlink.example.org;" in config
    (tmp_path / "gw" / "tmp").mkdir(parents=True)
    conf = tmp_path / "gw.conf"
    conf.write_text(config)
    checked = subprocess.run(
        [find_nginx(), "-e", str(tmp_path / "e.log"), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
