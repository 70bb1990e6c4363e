"""The import rules of the package structure, read from the source with ``ast`` (nothing is imported).

Packages, bottom to top: ``tunnel`` < ``contract`` (the agreement between gateway, daemon and
linkctl) < ``linkd`` | ``studio_gateway`` (side by side) < ``cli`` < ``scripts``. Every import
statement counts: at module level, inside functions, and under ``if TYPE_CHECKING:`` (such
imports are *type-only*: they never run, and the runtime rules below let them pass).

a. tunnel's sans-IO core imports no ``asyncio``, ``nats``, ``time`` (nor sockets, selectors,
   threads or datetime) at runtime: it does no I/O and the clock is injected; of the rest of
   tunnel it uses only ``_diagnostics`` (counters, event types). The core is every module
   under tunnel/ whose name (or package) starts with one underscore, except ``_handler.py``,
   ``_diagnostics.py`` and the ``_natsio/`` I/O package; computed, so new core modules are
   covered. When this test was written the core was tunnel/_caller.py, _codec.py, _config.py,
   _dispatch.py, _errors.py, _events.py, _flow.py, _frames.py, _headers.py, _server_stream.py,
   _subjects.py (a failure prints the current list).
b. Within tunnel/, nats-py is imported at runtime only under tunnel/_natsio/ and in
   tunnel/connect.py.
c. linkd never imports studio_gateway, and studio_gateway never imports linkd; contract
   imports neither (nor cli); tunnel imports none of linkd, studio_gateway, cli, contract.
   Type-only imports count here: a type is a dependency too.
d. Nothing outside a package imports that package's underscored (private) modules, e.g.
   ``from tunnel._frames import ...`` outside tunnel/. Checked in tunnel/, contract/, linkd/,
   studio_gateway/, cli/ and scripts/; tests/ may reach into private modules, and so may
   scripts/bench_codec_floor.py, which measures tunnel's wire codec itself.
e. cli imports studio_gateway only in cli/stack.py (the local stack runs the gateway), and
   linkd never: linkctl speaks to both through contract.

A package that does not exist (yet) is skipped. Each failure lists ``file:line: statement``.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGES: Final = ("tunnel", "contract", "linkd", "studio_gateway", "cli")
SCANNED: Final = (*PACKAGES, "scripts")

CORE_EXCEPTIONS: Final = frozenset({"_handler", "_diagnostics", "_natsio"})
CORE_FORBIDDEN: Final = frozenset(
    {"asyncio", "nats", "time", "socket", "selectors", "threading", "concurrent", "datetime"}
)
# The non-core tunnel modules the core may use: counters and event types (no I/O, no clock).
CORE_MAY_USE: Final = frozenset({"tunnel._diagnostics"})
# linkctl's one-command local stack runs the gateway itself (it mints the dev operator and
# a dev token), so that file alone may import the gateway; nothing in cli imports linkd.
CLI_RUNS_THE_GATEWAY: Final = frozenset({"cli.stack"})
NATS_ALLOWED: Final = ("tunnel._natsio", "tunnel.connect")
# Benchmarks of a private module itself (the codec, without the machinery around it).
MEASURES_PRIVATE_MODULES: Final = frozenset({"scripts.bench_codec_floor"})
NEVER_IMPORTS: Final[dict[str, frozenset[str]]] = {
    "linkd": frozenset({"studio_gateway"}),
    "studio_gateway": frozenset({"linkd"}),
    "contract": frozenset({"linkd", "studio_gateway", "cli"}),
    "tunnel": frozenset({"linkd", "studio_gateway", "cli", "contract"}),
}


@dataclass(frozen=True)
class Import:
    """One import statement of one scanned file."""

    path: str  # relative to the repository root
    module: str  # the importing module, dotted
    line: int
    statement: str
    targets: tuple[str, ...]  # absolute dotted names: the module, and module.name for each from-name
    type_only: bool
    in_function: bool

    def __str__(self) -> str:
        where = " (in a function)" if self.in_function else ""
        kind = " (type-only)" if self.type_only else ""
        return f"{self.path}:{self.line}: {self.statement}{where}{kind}"

    def top_levels(self) -> set[str]:
        return {target.split(".")[0] for target in self.targets}


# ------------------------------------------------------------------------------ scanning


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> tuple[str, ...]:
    if isinstance(node, ast.Import):
        return tuple(alias.name for alias in node.names)
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return (base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*"))


def _walk(
    node: ast.AST, type_only: bool = False, in_function: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import below ``node`` with (type-only, inside a function)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, type_only, in_function
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk_stmt(stmt, True, in_function)
            for stmt in child.orelse:
                yield from _walk_stmt(stmt, type_only, in_function)
        else:
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from _walk(child, type_only, inner)


def _walk_stmt(
    stmt: ast.stmt, type_only: bool, in_function: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        yield stmt, type_only, in_function
    else:
        inner = in_function or isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
        yield from _walk(stmt, type_only, inner)


def imports_of_source(source: str, path: str, module: str, is_package: bool = False) -> list[Import]:
    tree = ast.parse(source, filename=path)
    return [
        Import(
            path=path,
            module=module,
            line=node.lineno,
            statement=ast.unparse(node),
            targets=_targets(node, module, is_package),
            type_only=type_only,
            in_function=in_function,
        )
        for node, type_only, in_function in _walk(tree)
    ]


@functools.cache
def all_imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            found += imports_of_source(
                path.read_text(encoding="utf-8"),
                path.relative_to(ROOT).as_posix(),
                _module_name(path),
                is_package=path.name == "__init__.py",
            )
    return tuple(found)


def imports_in(*prefixes: str) -> list[Import]:
    """The imports of modules that are (or are inside) one of the dotted ``prefixes``."""
    return [imp for imp in all_imports() if any(_within(imp.module, prefix) for prefix in prefixes)]


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def private_owner(target: str) -> str | None:
    """For a private module (``tunnel._frames``, ``tunnel._natsio.server``), the package that
    owns it (``tunnel``): the name before its first underscored part; None for a public one."""
    parts = target.split(".")
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            if not _is_module(".".join(parts[: index + 1])):
                return None  # a private name inside a module, not a module
            return ".".join(parts[:index])
    return None


def core_modules() -> list[str]:
    """tunnel's sans-IO core (rule a), as paths."""
    tunnel = ROOT / "tunnel"
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in tunnel.rglob("*.py")
        if (first := path.relative_to(tunnel).parts[0].removesuffix(".py")).startswith("_")
        and not first.startswith("__")
        and first not in CORE_EXCEPTIONS
    )


def _report(rule: str, violations: list[Import], extra: str = "") -> str:
    lines = "\n".join(f"  {imp}" for imp in violations)
    return f"{rule}: {len(violations)} violation(s)\n{lines}{extra}"


def _check(rule: str, imports: list[Import], bad: Callable[[Import], bool], extra: str = "") -> None:
    violations = [imp for imp in imports if bad(imp)]
    if violations:
        pytest.fail(_report(rule, violations, extra), pytrace=False)


# ------------------------------------------------------------------------------ the rules


def test_a_tunnel_core_imports_no_asyncio_nats_or_time() -> None:
    core = core_modules()
    assert core, "no tunnel core modules found"
    core_imports = [imp for imp in all_imports() if imp.path in set(core)]
    _check(
        "rule a: the sans-IO core imports asyncio, nats or time at runtime",
        core_imports,
        lambda imp: not imp.type_only and bool(imp.top_levels() & CORE_FORBIDDEN),
        extra=f"\n  (core: {', '.join(core)})",
    )


def test_a_tunnel_core_uses_only_core_modules_of_tunnel() -> None:
    core = set(core_modules())
    core_names = {_module_name(ROOT / path) for path in core}

    def outside_core(imp: Import) -> bool:
        inner = {target for target in imp.targets if _within(target, "tunnel") and _is_module(target)}
        return any(
            target != "tunnel" and target not in core_names and target not in CORE_MAY_USE for target in inner
        )

    _check(
        "rule a: the sans-IO core imports a tunnel module outside the core",
        [imp for imp in all_imports() if imp.path in core and not imp.type_only],
        outside_core,
    )


def test_e_cli_imports_the_gateway_only_where_it_runs_it() -> None:
    _check(
        "rule e: cli imports studio_gateway outside cli/stack.py, or linkd",
        imports_in("cli"),
        lambda imp: (
            "linkd" in imp.top_levels()
            or ("studio_gateway" in imp.top_levels() and imp.module not in CLI_RUNS_THE_GATEWAY)
        ),
    )


def test_b_nats_is_imported_only_in_natsio_and_connect() -> None:
    _check(
        "rule b: nats imported at runtime in tunnel/ outside tunnel/_natsio/ and tunnel/connect.py",
        [imp for imp in imports_in("tunnel") if not any(_within(imp.module, ok) for ok in NATS_ALLOWED)],
        lambda imp: not imp.type_only and "nats" in imp.top_levels(),
    )


def test_c_linkd_and_studio_gateway_never_import_each_other() -> None:
    for package in ("linkd", "studio_gateway"):
        _check(
            f"rule c: {package} imports {' or '.join(sorted(NEVER_IMPORTS[package]))}",
            imports_in(package),
            lambda imp, package=package: bool(imp.top_levels() & NEVER_IMPORTS[package]),
        )


def test_c_contract_imports_neither_linkd_nor_studio_gateway() -> None:
    if not (ROOT / "contract").is_dir():
        return  # not created yet
    _check(
        "rule c: contract imports linkd, studio_gateway or cli",
        imports_in("contract"),
        lambda imp: bool(imp.top_levels() & NEVER_IMPORTS["contract"]),
    )


def test_c_tunnel_imports_nothing_above_it() -> None:
    _check(
        "rule c: tunnel imports linkd, studio_gateway, cli or contract",
        imports_in("tunnel"),
        lambda imp: bool(imp.top_levels() & NEVER_IMPORTS["tunnel"]),
    )


def test_d_nothing_outside_a_package_imports_its_private_modules() -> None:
    def outsider(imp: Import) -> bool:
        if imp.module in MEASURES_PRIVATE_MODULES:
            return False
        owners = {owner for target in imp.targets if (owner := private_owner(target))}
        return any(not _within(imp.module, owner) for owner in owners)

    _check("rule d: a package's private module imported from outside it", list(all_imports()), outsider)


# ------------------------------------------------------------------------------ the scanner itself


def test_the_scanner_sees_function_local_and_type_checking_imports() -> None:
    source = """
from __future__ import annotations
import typing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from nats.aio.client import Client
else:
    import json
if typing.TYPE_CHECKING:
    import asyncio
def f():
    import time
    from . import _frames
class C:
    async def g(self):
        from ..cli import main as m
"""
    found = imports_of_source(source, "tunnel/_x/y.py", "tunnel._x.y")
    by_line = {imp.line: imp for imp in found}
    assert (by_line[6].targets, by_line[6].type_only) == (("nats.aio.client", "nats.aio.client.Client"), True)
    assert (by_line[8].targets, by_line[8].type_only) == (("json",), False)
    assert by_line[10].type_only
    assert (by_line[12].targets, by_line[12].in_function, by_line[12].type_only) == (("time",), True, False)
    assert by_line[13].targets == ("tunnel._x", "tunnel._x._frames")
    assert by_line[16].targets == ("tunnel.cli", "tunnel.cli.main") and by_line[16].in_function
    assert str(by_line[12]) == "tunnel/_x/y.py:12: import time (in a function)"
    package = imports_of_source("from . import a\nfrom .b import c", "cli/__init__.py", "cli", True)
    assert [imp.targets for imp in package] == [("cli", "cli.a"), ("cli.b", "cli.b.c")]


def test_private_modules_are_told_from_private_names() -> None:
    assert private_owner("tunnel._natsio.server") == "tunnel"
    assert private_owner("tunnel._natsio") == "tunnel"
    assert private_owner("tunnel.connect") is None
    assert private_owner("tunnel.connect._not_a_module") is None
    assert private_owner("cli.__main__") is None
    assert len(all_imports()) > 500, "the scan found too few imports: is ROOT right?"
