"""TLS material for a federation: a certificate authority and a SuperLink certificate.

The coordinating centre keeps the CA private key; it hands the CA certificate
(``ca.crt``) to every hospital so that their SuperNodes can verify the SuperLink, and
it starts the SuperLink with ``superlink.crt`` / ``superlink.key``. The operator
presents ``operator.crt`` to the control plane's proxy (mutual TLS). Nothing here is
secret except the ``.key`` files, which are created readable by the owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flower_medimg.core.private_files import private_dir, write_private

__all__ = ["DEFAULT_HOSTS", "OPERATOR_NAME", "TlsFiles", "write_tls_files"]

#: Names the SuperLink certificate always covers: the loopback addresses the
#: SuperLink's own ServerApp launcher (SuperExec) and a local ``flwr`` use.
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

#: Common name of the operator's client certificate.
OPERATOR_NAME = "flower-medimg operator"


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the TLS files of a federation.

    Attributes
    ----------
    ca_cert : Path
        The CA certificate: shared with every hospital and every ``flwr`` user.
    ca_key : Path
        The CA private key: stays with the coordinating centre.
    server_cert : Path
        The SuperLink's certificate, signed by the CA.
    server_key : Path
        The SuperLink's private key: stays on the SuperLink host.
    operator_cert : Path
        The operator's client certificate (``clientAuth`` only), which the control
        plane's proxy asks for before it forwards a Control API request.
    operator_key : Path
        Its private key: stays with the operator.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    operator_cert: Path
    operator_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flower-medimg"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _issue(
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name],
    common_name: str,
    usage: x509.ObjectIdentifier,
    validity: tuple[datetime.datetime, datetime.datetime],
    alt_names: x509.SubjectAlternativeName | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Return a new key and a leaf certificate for it, signed by ``issuer``.

    The certificate may be used only for ``usage`` (``SERVER_AUTH`` or
    ``CLIENT_AUTH``): TLS refuses a server certificate presented as a client's.
    """
    ca_key, ca_name = issuer
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt_names is not None:
        builder = builder.add_extension(alt_names, critical=False)
    return key, builder.sign(ca_key, hashes.SHA384())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_tls_files(
    folder: str | Path,
    hosts: Sequence[str] = (),
    valid_days: int = 365,
) -> TlsFiles:
    """Create a CA, a SuperLink and an operator certificate signed by it in ``folder``.

    Parameters
    ----------
    folder : str or Path
        Where ``ca.crt``, ``ca.key``, ``superlink.crt``, ``superlink.key``,
        ``operator.crt`` and ``operator.key`` are written (created ``0o700`` if
        missing; existing files are replaced).
    hosts : Sequence[str], optional
        Host names or IP addresses under which hospitals reach the SuperLink (for
        example ``superlink.hospital-network.org``); :data:`DEFAULT_HOSTS` are always
        added.
    valid_days : int, optional
        Validity of the certificates in days.

    Returns
    -------
    TlsFiles
        The paths of the six files.
    """
    folder = private_dir(folder)
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = _key()
    ca_name = _name("flower-medimg federation CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    validity = (not_before, not_after)
    all_hosts = [*hosts, *DEFAULT_HOSTS]
    server_key, server_cert = _issue(
        (ca_key, ca_name),
        all_hosts[0],
        ExtendedKeyUsageOID.SERVER_AUTH,
        validity,
        _subject_alt_names(all_hosts),
    )
    operator_key, operator_cert = _issue(
        (ca_key, ca_name), OPERATOR_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, validity
    )

    files = TlsFiles(
        ca_cert=folder / "ca.crt",
        ca_key=folder / "ca.key",
        server_cert=folder / "superlink.crt",
        server_key=folder / "superlink.key",
        operator_cert=folder / "operator.crt",
        operator_key=folder / "operator.key",
    )
    _write_cert(files.ca_cert, ca_cert)
    _write_key(files.ca_key, ca_key)
    _write_cert(files.server_cert, server_cert)
    _write_key(files.server_key, server_key)
    _write_cert(files.operator_cert, operator_cert)
    _write_key(files.operator_key, operator_key)
    return files
