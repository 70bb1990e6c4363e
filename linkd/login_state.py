"""What ``linkd login`` remembers besides the token: the gateway URL (``login.json`` in the config dir).

Not a secret, so a plain file; ``linkd up`` falls back to it when no ``--gateway``
flag, ``LINKD_GATEWAY`` or config file setting names one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .dirs import config_dir, ensure_private_dir

__all__ = ["LOGIN_FILE_NAME", "clear_login", "login_path", "read_login_gateway", "write_login"]

LOGIN_FILE_NAME: Final = "login.json"


def login_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / LOGIN_FILE_NAME


def read_login_gateway(environ: Mapping[str, str] | None = None) -> str | None:
    try:
        data = json.loads(login_path(environ).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    gateway = data.get("gateway") if isinstance(data, dict) else None
    return gateway if isinstance(gateway, str) and gateway else None


def write_login(gateway: str, environ: Mapping[str, str] | None = None) -> Path:
    path = login_path(environ)
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"gateway": gateway}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def clear_login(environ: Mapping[str, str] | None = None) -> bool:
    with contextlib.suppress(FileNotFoundError):
        login_path(environ).unlink()
        return True
    return False
