"""Secrets of the desktop: the gateway API token and the daemon's own NATS nkey seed.

They live in the OS keyring (macOS Keychain, Windows Credential Locker, Secret
Service on Linux) through ``keyring``, under the service name ``natslink-linkd``.

Headless machines often have no keyring backend at all. Then nothing is stored
silently in plain files: :class:`StoreUnavailable` explains the choice, and only
an explicit opt-in (``--insecure-file-store`` or ``LINKD_INSECURE_FILE_STORE=1``)
stores secrets as files readable by the user only (0600, in a 0700 directory
under the config dir). A secret file that others can read is refused, like ssh does.

Tests select their own backend with ``keyring.set_keyring(...)`` (in-process) or
``PYTHON_KEYRING_BACKEND`` (subprocesses); this module never picks one itself.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Protocol

import keyring
import keyring.backends.fail
import keyring.errors
import nkeys

from .dirs import config_dir, ensure_private_dir
from .errors import LinkdError

__all__ = [
    "INSECURE_FILE_STORE_ENV",
    "SEED_KEY",
    "SERVICE_NAME",
    "TOKEN_KEY",
    "FileStore",
    "KeyringStore",
    "SecretStore",
    "StoreUnavailable",
    "file_store",
    "generate_seed",
    "insecure_opt_in",
    "keyring_usable",
    "load_or_create_seed",
    "open_store",
    "public_key_of",
]

SERVICE_NAME: Final = "natslink-linkd"
TOKEN_KEY: Final = "gateway-token"
SEED_KEY: Final = "nkey-seed"
INSECURE_FILE_STORE_ENV: Final = "LINKD_INSECURE_FILE_STORE"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


class StoreUnavailable(LinkdError):
    """No usable OS keyring, and the file fallback was not opted into."""


class SecretStore(Protocol):
    """A small key -> secret map."""

    @property
    def description(self) -> str: ...

    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; False when it was not there."""
        ...


def _backend_name(backend: object) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def keyring_usable() -> tuple[bool, str]:
    """(usable, why not / backend name). The fail and null backends store nothing."""
    try:
        backend = keyring.get_keyring()
    except Exception as exc:  # a broken keyring configuration must not crash the CLI
        return False, f"the keyring configuration is broken ({type(exc).__name__}: {exc})"
    name = _backend_name(backend)
    if isinstance(backend, keyring.backends.fail.Keyring) or name.startswith("keyring.backends.null."):
        return False, "no OS keyring backend is available on this machine"
    return True, name


class KeyringStore:
    """Secrets in the OS keyring (whatever ``keyring.get_keyring()`` is at call time)."""

    def __init__(self, service: str = SERVICE_NAME) -> None:
        self.service = service

    @property
    def description(self) -> str:
        return f"the OS keyring ({_backend_name(keyring.get_keyring())}, service {self.service!r})"

    def get(self, key: str) -> str | None:
        try:
            return keyring.get_password(self.service, key)
        except keyring.errors.KeyringError as exc:
            raise _keyring_failed("read from", exc) from None

    def set(self, key: str, value: str) -> None:
        try:
            keyring.set_password(self.service, key, value)
        except keyring.errors.KeyringError as exc:
            raise _keyring_failed("write to", exc) from None

    def delete(self, key: str) -> bool:
        try:
            if keyring.get_password(self.service, key) is None:
                return False
            keyring.delete_password(self.service, key)
        except keyring.errors.PasswordDeleteError:
            return False
        except keyring.errors.KeyringError as exc:
            raise _keyring_failed("delete from", exc) from None
        return True


def _keyring_failed(action: str, exc: Exception) -> LinkdError:
    if isinstance(exc, keyring.errors.NoKeyringError):
        return StoreUnavailable(_no_keyring_message("no OS keyring backend is available on this machine"))
    detail = str(exc) or type(exc).__name__
    return LinkdError(f"cannot {action} the OS keyring: {detail} (is it locked?)")


class FileStore:
    """Secrets as files readable by the user only: ``<dir>/<key>``, mode 0600, dir 0700."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def description(self) -> str:
        return f"files in {self.directory} (insecure file store)"

    def _path(self, key: str) -> Path:
        if not key or "/" in key or "\\" in key or key.startswith("."):
            raise ValueError(f"bad secret name {key!r}")
        return self.directory / key

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise LinkdError(
                f"{path} is accessible by other users; refusing to use it (run: chmod 600 {path})"
            )
        return path.read_text(encoding="utf-8").strip() or None

    def set(self, key: str, value: str) -> None:
        path = self._path(key)
        ensure_private_dir(self.directory)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.directory)  # mkstemp creates 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(value + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        return True


def _no_keyring_message(why: str) -> str:
    return (
        f"{why}, so linkd cannot store secrets safely. Install and unlock a keyring "
        "(e.g. GNOME Keyring / KWallet via Secret Service), or opt in to plain files readable "
        f"only by you with --insecure-file-store (or {INSECURE_FILE_STORE_ENV}=1)"
    )


def insecure_opt_in(flag: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    if flag is not None:
        return flag
    env = os.environ if environ is None else environ
    return env.get(INSECURE_FILE_STORE_ENV, "").strip().lower() in _TRUE


def open_store(*, insecure_file_store: bool = False, environ: Mapping[str, str] | None = None) -> SecretStore:
    """The OS keyring when usable; else the file store if opted into; else :class:`StoreUnavailable`."""
    usable, detail = keyring_usable()
    if usable:
        return KeyringStore()
    if insecure_file_store:
        return FileStore(config_dir(environ) / "secrets")
    raise StoreUnavailable(_no_keyring_message(detail))


def file_store(environ: Mapping[str, str] | None = None) -> FileStore:
    return FileStore(config_dir(environ) / "secrets")


def generate_seed() -> str:
    """A fresh NATS user nkey seed (``SU...``)."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode("ascii")


def public_key_of(seed: str) -> str:
    """The public key (``U...``) of a user seed; :class:`LinkdError` when it is not one."""
    try:
        keypair = nkeys.from_seed(bytearray(seed.strip().encode("ascii")))
        public: str = keypair.public_key.decode("ascii")
        keypair.wipe()
    except Exception:
        raise LinkdError("the stored NATS key is corrupt; run 'linkd logout' and log in again") from None
    if not public.startswith("U"):
        raise LinkdError("the stored NATS key is not a user key; run 'linkd logout' and log in again")
    return public


def load_or_create_seed(store: SecretStore) -> str:
    """The daemon's nkey seed, generated and stored on first use."""
    seed = store.get(SEED_KEY)
    if seed:
        public_key_of(seed)
        return seed.strip()
    seed = generate_seed()
    store.set(SEED_KEY, seed)
    return seed
