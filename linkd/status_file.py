"""The status file of a running ``linkd up``: one JSON document, replaced atomically, removed on exit.

``linkd status`` reads it; a file whose ``pid`` is no longer alive is stale (the
daemon was killed) and reported as such. Written 0600: it names the host and the
runs of this desktop.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .dirs import ensure_private_dir

__all__ = ["pid_alive", "read_status", "remove_status", "write_status"]


def write_status(path: Path, document: dict[str, Any]) -> None:
    """Replace ``path`` with ``document`` atomically (a reader sees the old or the new one, whole)."""
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_status(path: Path) -> dict[str, Any] | None:
    """The document, or None when there is no (readable, well-formed) status file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_status(path: Path, pid: int | None = None) -> None:
    """Remove the file (only if it is ours, when ``pid`` is given)."""
    if pid is not None:
        current = read_status(path)
        if current is not None and current.get("pid") != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
