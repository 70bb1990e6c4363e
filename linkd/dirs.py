"""Where linkd keeps its files.

- config dir: ``linkd.toml`` (the config file), ``login.json`` (the gateway URL of the
  last ``linkd login``) and, only with the explicit insecure opt-in, ``secrets/``.
  ``$LINKD_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/natslink`` or ``~/.config/natslink``
  (macOS: ``~/Library/Application Support/natslink``; Windows: ``%APPDATA%\\natslink``).
- runtime dir: the status file of a running daemon. ``$LINKD_RUNTIME_DIR``, else
  ``$XDG_RUNTIME_DIR/natslink`` when that is set (Linux), else the config dir.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = ["APP_DIR_NAME", "config_dir", "ensure_private_dir", "runtime_dir"]

APP_DIR_NAME: Final = "natslink"


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get("LINKD_CONFIG_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    home = Path(env.get("HOME", "").strip() or Path.home())
    if sys.platform == "win32":
        base = Path(env.get("APPDATA", "").strip() or home / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        xdg = env.get("XDG_CONFIG_HOME", "").strip()
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".config"
    return base / APP_DIR_NAME


def runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get("LINKD_RUNTIME_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_RUNTIME_DIR", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_DIR_NAME
    return config_dir(env)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing; a directory we create is private to the user (0700)."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
