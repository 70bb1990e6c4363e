"""``tunnel.asgi`` is becoming a package: this step only moves the module (so its history
follows) and serves it under its old name; the next commit splits it."""

import sys

from . import _http

sys.modules[__name__] = _http
