"""What ``linkd login`` remembers besides the token (``login.json`` in the config dir): the
gateway URL, and whether the secrets went to the insecure file store.

Not a secret, so a plain file; ``linkd up`` falls back to the URL when no ``--gateway``
flag, ``LINKD_GATEWAY`` or config file setting names one, and to the file store when no
``--insecure-file-store`` flag, variable or config setting says either way (so a login made
with ``--insecure-file-store`` needs no flag at every ``linkd up``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from .dirs import config_dir, ensure_private_dir

__all__ = [
    "LOGIN_FILE_NAME",
    "clear_login",
    "login_path",
    "read_login_file_store",
    "read_login_gateway",
    "write_login",
]

LOGIN_FILE_NAME: Final = "login.json"


def login_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / LOGIN_FILE_NAME


def _read(environ: Mapping[str, str] | None) -> dict[str, Any]:
    try:
        data = json.loads(login_path(environ).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_login_gateway(environ: Mapping[str, str] | None = None) -> str | None:
    gateway = _read(environ).get("gateway")
    return gateway if isinstance(gateway, str) and gateway else None


def read_login_file_store(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the last login kept its secrets in the insecure file store."""
    return _read(environ).get("secretStore") == "file"


def write_login(gateway: str, environ: Mapping[str, str] | None = None, *, file_store: bool = False) -> Path:
    path = login_path(environ)
    ensure_private_dir(path.parent)
    doc: dict[str, Any] = {"gateway": gateway}
    if file_store:
        doc["secretStore"] = "file"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def clear_login(environ: Mapping[str, str] | None = None) -> bool:
    with contextlib.suppress(FileNotFoundError):
        login_path(environ).unlink()
        return True
    return False
