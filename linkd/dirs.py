"""Where linkd keeps its files.

- config dir: ``linkd.toml`` (the config file), ``login.json`` (the gateway URL of the
  last ``linkd login``) and, only with the explicit insecure opt-in, ``secrets/``.
  ``$LINKD_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/natslink`` or ``~/.config/natslink``
  (macOS: ``~/Library/Application Support/natslink``; Windows: ``%APPDATA%\\natslink``).
- runtime dir: the status file of a running daemon. ``$LINKD_RUNTIME_DIR``, else
  ``$XDG_RUNTIME_DIR/natslink`` when that is set (Linux), else the config dir.
- state dir: the run event journal (:mod:`linkd.journal`), which must outlive a reboot (so
  not the runtime dir, often a tmpfs). ``$LINKD_STATE_DIR``, else ``<config dir>/state`` when
  ``$LINKD_CONFIG_DIR`` names a profile of its own (several daemons on one machine, tests),
  else ``$XDG_STATE_HOME/natslink`` or ``~/.local/state/natslink`` (macOS and Windows: the
  config dir's ``state``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = ["APP_DIR_NAME", "config_dir", "ensure_private_dir", "runtime_dir", "state_dir"]

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


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get("LINKD_STATE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    if env.get("LINKD_CONFIG_DIR", "").strip() or sys.platform in ("win32", "darwin"):
        return config_dir(env) / "state"
    home = Path(env.get("HOME", "").strip() or Path.home())
    xdg = env.get("XDG_STATE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "state"
    return base / APP_DIR_NAME


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing; a directory we create is private to the user (0700)."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
