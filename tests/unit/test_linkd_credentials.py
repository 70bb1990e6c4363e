"""The secret store: OS keyring when usable, a clear refusal without one, an explicit 0600 file fallback.

Every test runs against a keyring backend of its own (never the user's keyring).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest

from linkd.credentials_store import (
    SEED_KEY,
    SERVICE_NAME,
    TOKEN_KEY,
    FileStore,
    KeyringStore,
    StoreUnavailable,
    load_or_create_seed,
    open_store,
    public_key_of,
)
from linkd.errors import LinkdError
from tests.linkd_support import MemoryKeyring, isolated_env

__all__ = ["isolated_env"]


def test_keyring_store_round_trip(isolated_env: MemoryKeyring) -> None:
    store = open_store()
    assert isinstance(store, KeyringStore)
    assert store.get(TOKEN_KEY) is None
    store.set(TOKEN_KEY, "tok-1")
    assert isolated_env.data[(SERVICE_NAME, TOKEN_KEY)] == "tok-1"
    assert store.get(TOKEN_KEY) == "tok-1"
    assert store.delete(TOKEN_KEY) is True
    assert store.delete(TOKEN_KEY) is False
    assert store.get(TOKEN_KEY) is None
    assert "MemoryKeyring" in store.description


def test_seed_is_created_once_and_is_a_user_key(isolated_env: MemoryKeyring) -> None:
    store = open_store()
    seed = load_or_create_seed(store)
    assert seed.startswith("SU")
    assert public_key_of(seed).startswith("U")
    assert load_or_create_seed(store) == seed
    store.set(SEED_KEY, "garbage")
    with pytest.raises(LinkdError, match="corrupt"):
        load_or_create_seed(store)


def test_no_keyring_is_a_clear_refusal_unless_the_file_store_is_opted_into(
    isolated_env: MemoryKeyring, tmp_path: Path
) -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())
    with pytest.raises(StoreUnavailable) as info:
        open_store()
    message = str(info.value)
    assert "no OS keyring backend" in message and "--insecure-file-store" in message
    assert "LINKD_INSECURE_FILE_STORE=1" in message
    # A keyring that breaks while in use says so too.
    with pytest.raises(StoreUnavailable):
        KeyringStore().get(TOKEN_KEY)

    store = open_store(insecure_file_store=True)
    assert isinstance(store, FileStore)
    store.set(TOKEN_KEY, "tok-file")
    path = store.directory / TOKEN_KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert store.directory == tmp_path / "config" / "secrets"
    assert store.get(TOKEN_KEY) == "tok-file"
    assert [p.name for p in store.directory.iterdir()] == [TOKEN_KEY]  # no temp files left behind
    # Readable by others: refused, with the fix.
    os.chmod(path, 0o644)
    with pytest.raises(LinkdError, match="chmod 600"):
        store.get(TOKEN_KEY)
    os.chmod(path, 0o600)
    assert store.delete(TOKEN_KEY) is True and store.get(TOKEN_KEY) is None
    with pytest.raises(ValueError):
        store.get("../escape")
