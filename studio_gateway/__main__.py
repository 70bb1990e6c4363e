"""``studio-gateway`` / ``python -m studio_gateway``: the command, or one line saying what to install.

The gateway's libraries (aiohttp, PyJWT, cryptography) are the ``gateway`` extra, not part of a
desktop-only install; without them the command says so instead of showing a traceback.
"""

from __future__ import annotations

import sys
from typing import Final

# Exit status when the gateway's libraries are not installed (EX_UNAVAILABLE, sysexits.h).
EXIT_MISSING_EXTRA: Final = 69


def main() -> None:
    try:
        from .cli import main as run
    except ModuleNotFoundError as exc:
        sys.stderr.write(
            f"studio-gateway: the gateway's libraries are not installed (missing module {exc.name!r}); "
            "install them with: pip install 'natslink[gateway]'\n"
        )
        sys.exit(EXIT_MISSING_EXTRA)
    run()


if __name__ == "__main__":
    main()
