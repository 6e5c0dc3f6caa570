"""The server's signing key: what authenticates resume states, the registry and audit.

Whoever can write the registry or a run folder must not be able to make the
ServerApp resume from a state it did not write, nor rewrite a registry record or
an audit log unseen. Every such record is signed with the server's Ed25519 key
(Bernstein et al., "High-speed high-security signatures", 2012; RFC 8032), kept
outside the registry and run folders.

A signature rather than an HMAC: verifying needs only the public key
(``<key>.pub``, written next to the private key), so a site or an auditor can check
an audit log or a model card without holding a secret that could forge them.

The key's file is, in this order of precedence, the run config's
``registry.key-path``, the environment variable ``FLOWER_MEDIMG_SERVER_KEY`` or
``~/.flower-medimg/server_ed25519.pem``. It is created at first use with mode 0600
from its first byte (``os.open``) and linked into place atomically, so neither a
reader nor a second ServerApp starting at the same time sees half a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "DEFAULT_KEY_PATH",
    "KEY_ENV",
    "ServerKeyError",
    "ServerKey",
    "VerifyKey",
    "check_key_outside",
    "key_path",
]

#: Environment variable naming the server key's file.
KEY_ENV = "FLOWER_MEDIMG_SERVER_KEY"
#: Where the key lives when neither the run config nor the environment says.
DEFAULT_KEY_PATH = Path("~/.flower-medimg/server_ed25519.pem")


class ServerKeyError(RuntimeError):
    """The server key cannot be read, is unsafe, or lies where it must not."""


def key_path(configured: str = "") -> Path:
    """Return the server key's file, made absolute.

    The first that is set of ``configured`` (``registry.key-path``),
    ``$FLOWER_MEDIMG_SERVER_KEY`` and :data:`DEFAULT_KEY_PATH`.
    """
    chosen = configured.strip() or os.environ.get(KEY_ENV, "").strip()
    return Path(chosen or DEFAULT_KEY_PATH).expanduser().resolve()


def check_key_outside(key: Path, folders: dict[str, Path]) -> None:
    """Refuse a key that lies inside one of ``folders`` (``{what: folder}``).

    Raises
    ------
    ServerKeyError
        Naming the key and the folder: whoever writes that folder could replace it.
    """
    for what, folder in folders.items():
        if key.is_relative_to(folder.expanduser().resolve()):
            raise ServerKeyError(
                f"The server key {key} lies inside the {what} {folder}: whoever can "
                f"write there could replace it. Set registry.key-path or "
                f"{KEY_ENV} to a file outside it."
            )


def _public_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


class VerifyKey:
    """An Ed25519 public key: checks signatures made by the server key.

    Parameters
    ----------
    public : Ed25519PublicKey
        The key.
    source : str
        Where it was read from (in error messages).
    """

    def __init__(self, public: Ed25519PublicKey, source: str) -> None:
        self._public = public
        self.source = source
        raw = public.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        #: First 16 hex digits of the SHA-256 of the raw public key.
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path) -> VerifyKey:
        """Read a public key (``.pub``) or derive it from a private key file.

        ``path`` may name either: ``<key>.pub`` next to a private key is used when
        it exists, so a verifier needs no access to the private key.

        Raises
        ------
        ServerKeyError
            If neither file exists or the file holds no Ed25519 key.
        """
        path = Path(path).expanduser().resolve()
        public_file = path if path.suffix == ".pub" else _public_path(path)
        if public_file.is_file():
            key = _read_pem(public_file, public=True)
            return cls(key, str(public_file))
        if path.is_file():
            return ServerKey.load(path).public
        raise ServerKeyError(
            f"No server key at {path} (nor {public_file}); the key that signed the "
            f"records is needed to verify them (set {KEY_ENV} or pass its .pub file)"
        )

    def verify(self, data: bytes, signature: str) -> bool:
        """Return whether ``signature`` (hex) is this key's signature of ``data``."""
        try:
            self._public.verify(bytes.fromhex(signature), data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def public_pem(self) -> str:
        """Return the public key as PEM text (for model cards)."""
        return self._public.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        ).decode()


class ServerKey(VerifyKey):
    """The server's Ed25519 private key: signs, and verifies like :class:`VerifyKey`.

    Parameters
    ----------
    private : Ed25519PrivateKey
        The key.
    source : str
        Its file.
    """

    def __init__(self, private: Ed25519PrivateKey, source: str) -> None:
        super().__init__(private.public_key(), source)
        self._private = private

    @property
    def public(self) -> VerifyKey:
        """The public half."""
        return VerifyKey(self._private.public_key(), self.source)

    def sign(self, data: bytes) -> str:
        """Return the signature of ``data`` (128 hex digits)."""
        return self._private.sign(data).hex()

    @classmethod
    def load(cls, path: str | Path) -> ServerKey:
        """Read the private key at ``path``.

        Raises
        ------
        ServerKeyError
            If the file is missing, readable by others than its owner, or holds no
            Ed25519 private key.
        """
        path = Path(path)
        try:
            mode = path.stat().st_mode & 0o777
        except OSError as err:
            raise ServerKeyError(f"Cannot read the server key {path}: {err}") from None
        if mode & 0o077:
            raise ServerKeyError(
                f"The server key {path} has mode {mode:o}: others may read it; "
                f"make it private (chmod 600 {path})"
            )
        return cls(_read_pem(path, public=False), str(path))

    @classmethod
    def load_or_create(cls, path: str | Path) -> ServerKey:
        """Read the key at ``path``, creating it (mode 0600) and its ``.pub`` if new.

        Raises
        ------
        ServerKeyError
            As :meth:`load`, or if the key cannot be written.
        """
        path = Path(path).expanduser().resolve()
        if not path.exists():
            try:
                _create(path)
            except OSError as err:
                raise ServerKeyError(
                    f"Cannot create the server key {path}: {err}"
                ) from None
        return cls.load(path)


def _read_pem(path: Path, *, public: bool) -> Ed25519PublicKey | Ed25519PrivateKey:
    try:
        data = path.read_bytes()
        key = (
            serialization.load_pem_public_key(data)
            if public
            else serialization.load_pem_private_key(data, password=None)
        )
    except (OSError, ValueError, TypeError) as err:
        raise ServerKeyError(f"Cannot read the server key {path}: {err}") from None
    wanted = Ed25519PublicKey if public else Ed25519PrivateKey
    if not isinstance(key, wanted):
        raise ServerKeyError(f"{path} holds no Ed25519 key")
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode``, then link it to ``path``.

    The file has its mode from the first byte, and ``path`` appears only complete;
    if another process created ``path`` first, its file is kept.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # a concurrent start won: use it
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    _write_new(
        path,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    key = ServerKey.load(path)  # the file that won, if another start raced us
    public_file = _public_path(path)
    if not public_file.exists():
        _write_new(public_file, key.public_pem().encode(), 0o644)
