"""Test support for linkd: keyring backends of our own (never the user's keyring) and an isolated environment.

- :class:`MemoryKeyring`: in-process, installed with ``keyring.set_keyring``;
- :class:`FileKeyring`: a JSON file named by ``$LINKD_TEST_KEYRING``, for ``linkd`` subprocesses
  (``PYTHON_KEYRING_BACKEND=tests.linkd_support.FileKeyring`` with the repo on ``PYTHONPATH``);
- :func:`isolated_env` fixture: config and runtime dirs in ``tmp_path``, no ``LINKD_*`` from the
  outside, and a fresh :class:`MemoryKeyring`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.errors
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


class MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.data.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.data[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.data.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("not found")


class FileKeyring(keyring.backend.KeyringBackend):
    """A keyring in one JSON file (``$LINKD_TEST_KEYRING``), shared by test subprocesses."""

    priority = 1  # type: ignore[assignment]

    @property
    def path(self) -> Path:
        return Path(os.environ["LINKD_TEST_KEYRING"])

    def _load(self) -> dict[str, str]:
        try:
            data: dict[str, str] = json.loads(self.path.read_text(encoding="utf-8"))
            return data
        except FileNotFoundError:
            return {}

    def _save(self, data: dict[str, str]) -> None:
        self.path.write_text(json.dumps(data), encoding="utf-8")

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data[f"{service}/{username}"] = password
        self._save(data)

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if data.pop(f"{service}/{username}", None) is None:
            raise keyring.errors.PasswordDeleteError("not found")
        self._save(data)


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryKeyring]:
    """linkd sees only ``tmp_path`` and an in-memory keyring; yields the keyring."""
    for name in list(os.environ):
        if name.startswith("LINKD_") or name == "PYTHON_KEYRING_BACKEND":
            monkeypatch.delenv(name)
    monkeypatch.setenv("LINKD_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("LINKD_RUNTIME_DIR", str(tmp_path / "run"))
    # `linkd status` also looks for a `linkctl dev` stack's daemon: never the user's real one.
    monkeypatch.setenv("LINKCTL_STATE_DIR", str(tmp_path / "dev-stack"))
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        keyring.set_keyring(previous)


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``linkd`` subprocess: isolated dirs, the file keyring, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKD_")}
    env.update(
        LINKD_CONFIG_DIR=str(tmp_path / "config"),
        LINKD_RUNTIME_DIR=str(tmp_path / "run"),
        LINKCTL_STATE_DIR=str(tmp_path / "dev-stack"),
        LINKD_TEST_KEYRING=str(tmp_path / "keyring.json"),
        PYTHON_KEYRING_BACKEND="tests.linkd_support.FileKeyring",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in ("Z", "X")


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
