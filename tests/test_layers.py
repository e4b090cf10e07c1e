"""The layer rules of DESIGN.md, held by reading every module's imports.

    kernel <- probes <- trainer <- scaling.sweep, evals;  dashboards and alerts read the kernel and
    yoto.scaling's fits, which read only the kernel;  the CLI wires them all.

Every module of the installed packages (pyproject's ``package-dir``) is parsed, and every
``import`` / ``from ... import`` in it is checked, wherever it stands: at the top, inside a
function (the lazy imports of heavy modules) or under ``if TYPE_CHECKING:``. Relative
imports are resolved to their ``yoto.*`` names. Imports outside ``yoto`` (numpy, torch) are
not layers and are not checked here; ``yoto.scaling``'s fits are also checked to import no
torch when imported for real.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS["package-dir"]  # "yoto.trainer" -> "trainer"

# --- the rules ----------------------------------------------------------------------------

# A module belongs to the layer of the longest prefix of its name in this table.
LAYER_OF_PREFIX = {
    "yoto": "kernel",
    "yoto.cli": "cli",
    "yoto.probes": "probes",
    "yoto.trainer": "trainer",
    "yoto.scaling": "scaling fits",  # the package, laws, runs: analysis of run directories
    "yoto.scaling.sweep": "sweep",  # orchestration: runs the trainer
    "yoto.dashboards": "dashboards",
    "yoto.alerts": "alerts",
    "yoto.evals": "evals",  # beside the sweep: uses of checkpoints (yoto export)
}
EVERY_LAYER = frozenset(LAYER_OF_PREFIX.values())

# layer -> the layers its modules may import (each may import itself)
MAY_IMPORT = {
    "kernel": {"kernel"},
    "probes": {"kernel", "probes"},
    "trainer": {"kernel", "probes", "trainer"},
    "scaling fits": {"kernel", "scaling fits"},
    "sweep": {"kernel", "probes", "trainer", "scaling fits", "sweep"},
    "dashboards": {"kernel", "scaling fits", "dashboards"},
    "alerts": {"kernel", "scaling fits", "alerts"},
    "evals": {"kernel", "probes", "trainer", "scaling fits", "evals"},
    "cli": EVERY_LAYER,
}

# (importing module, imported name) pairs that break a rule today and are known: each with
# why it is allowed for now, for the owner of that module to remove. Empty: none.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str | None:
    """The layer of a ``yoto.*`` name (a module, or a name imported from one); None outside
    yoto."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYER_OF_PREFIX.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


# --- reading the modules ------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # yoto.trainer.model
    path: Path
    is_package: bool  # an __init__.py: relative imports start from the module itself


@dataclass(frozen=True)
class Import:
    module: Module
    line: int
    statement: str  # as written, e.g. "from .model import GPT"
    target: str  # the yoto.* name it reaches, e.g. yoto.trainer.model.GPT


def modules() -> list[Module]:
    """Every .py file under the package folders, named as installed."""
    found = []
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            found.append(Module(name, path, path.name == "__init__.py"))
    return found


def imports_of(module: Module) -> list[Import]:
    """Every import in the module, in source order, one per name it reaches."""
    source = module.path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(source, filename=str(module.path))):
        # ast.walk visits every node: function bodies and TYPE_CHECKING blocks too
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            # `from yoto.scaling import sweep` reaches the module yoto.scaling.sweep: the
            # imported name is part of the target
            targets = [base if a.name == "*" else f"{base}.{a.name}" for a in node.names]
        else:
            continue
        statement = " ".join((ast.get_source_segment(source, node) or "").split())
        out.extend(Import(module, node.lineno, statement, target) for target in targets)
    return sorted(out, key=lambda imp: imp.line)


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name a (possibly relative) ``from`` import starts from."""
    if node.level == 0:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise AssertionError(
            f"{module.path}:{node.lineno}: relative import beyond the top of {module.name}"
        )
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def violations(found: list[Import]) -> list[str]:
    """One line per import that breaks a rule: where, what, and the rule."""
    broken = []
    for imp in found:
        importer, imported = layer_of(imp.module.name), layer_of(imp.target)
        if imported is None or imported in MAY_IMPORT[importer]:
            continue
        if (imp.module.name, imp.target) in KNOWN_EXCEPTIONS:
            continue
        allowed = ", ".join(sorted(MAY_IMPORT[importer]))
        where = (
            imp.module.path.relative_to(ROOT)
            if imp.module.path.is_relative_to(ROOT)
            else imp.module.path
        )
        broken.append(
            f"{where}:{imp.line}: `{imp.statement}` makes {imp.module.name} ({importer}) "
            f"import {imp.target} ({imported}); the {importer} layer may import only: {allowed}"
        )
    return broken


ALL_IMPORTS = [imp for m in modules() for imp in imports_of(m)]


# --- the tests ----------------------------------------------------------------------------


def test_every_module_keeps_to_its_layer() -> None:
    broken = violations(ALL_IMPORTS)
    assert not broken, "layer rules of DESIGN.md broken:\n  " + "\n  ".join(broken)


def test_every_package_has_a_layer() -> None:
    """A new top-level package (yoto.evals) would otherwise fall under "yoto", the kernel."""
    missing = sorted(set(PACKAGE_DIRS) - set(LAYER_OF_PREFIX))
    assert not missing, f"give these packages a layer in LAYER_OF_PREFIX: {missing}"


def test_known_exceptions_are_still_needed() -> None:
    """An allowance whose import is gone must be removed with it."""
    present = {(imp.module.name, imp.target) for imp in ALL_IMPORTS}
    stale = [f"{m} -> {t}" for m, t in KNOWN_EXCEPTIONS if (m, t) not in present]
    assert not stale, f"remove these from KNOWN_EXCEPTIONS: {', '.join(stale)}"


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A lazy import in a function, one under TYPE_CHECKING, relative ones and a name that
    is a module are all found and resolved, and each breaks the kernel's rule here."""
    (tmp_path / "fake.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "from yoto import catalog, scaling\n"
        "if TYPE_CHECKING:\n"
        "    from yoto.probes.runner import ProbeRunner\n"
        "def f():\n"
        "    import yoto.trainer.model\n"
        "    from .dashboards.live import exporter\n"
    )
    found = imports_of(Module("yoto.fake", tmp_path / "fake.py", is_package=False))
    assert [imp.target for imp in found] == [
        "typing.TYPE_CHECKING",
        "numpy",
        "yoto.catalog",
        "yoto.scaling",
        "yoto.probes.runner.ProbeRunner",
        "yoto.trainer.model",
        "yoto.dashboards.live.exporter",
    ]
    broken = violations(found)
    assert [line.split(":")[1] for line in broken] == ["3", "5", "7", "8"]
    assert broken[0].endswith(
        "`from yoto import catalog, scaling` makes yoto.fake (kernel) import yoto.scaling "
        "(scaling fits); the kernel layer may import only: kernel"
    )


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("yoto.runstore", "kernel"),
        ("yoto.cli", "cli"),
        ("yoto.scaling", "scaling fits"),
        ("yoto.scaling.laws.fit", "scaling fits"),
        ("yoto.scaling.sweep", "sweep"),
        ("yoto.evals.export", "evals"),
        ("yoto.dashboards.postmortem.views.scaling", "dashboards"),
        ("numpy", None),
    ],
)
def test_layer_of_a_name(name: str, layer: str | None) -> None:
    assert layer_of(name) == layer


def test_the_scaling_fits_import_no_torch() -> None:
    """The explorer imports the fits: neither the package nor its fit and run-reading
    modules may pull in torch (seconds of import) or the trainer."""
    code = (
        "import sys\n"
        "import yoto.scaling, yoto.scaling.laws, yoto.scaling.runs\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('yoto.trainer'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "", f"importing the fits imported: {done.stdout.strip()}"


# --- pyproject matches the folders --------------------------------------------------------

NOT_INSTALLED = {"tests"}  # folders with an __init__.py that are not part of the package


def test_package_dirs_are_the_top_level_packages() -> None:
    top = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_INSTALLED
    assert set(PACKAGE_DIRS.values()) == top, (
        f"pyproject package-dir maps {sorted(PACKAGE_DIRS.values())}; the folders with an "
        f"__init__.py are {sorted(top)}"
    )


def test_package_list_matches_the_folders() -> None:
    """Every folder with an __init__.py under a package folder is in pyproject's
    ``packages`` (else a clean install leaves it out), and every listed one exists."""
    on_disk = {m.name for m in modules() if m.is_package}  # named as installed
    listed = set(SETUPTOOLS["packages"])
    assert listed == on_disk, (
        f"in pyproject, not on disk: {sorted(listed - on_disk)}; "
        f"on disk, not in pyproject: {sorted(on_disk - listed)}"
    )


def test_every_module_is_shipped() -> None:
    """A .py file outside a listed package (the explorer's page files) must be package
    data of the package above it, or a clean install would not have it."""
    packages = set(SETUPTOOLS["packages"])
    data = SETUPTOOLS.get("package-data", {})
    unshipped = []
    for m in modules():
        holder = m.name if m.is_package else m.name.rpartition(".")[0]
        if holder in packages:
            continue
        if not any(_is_package_data(m.path, pkg, globs) for pkg, globs in data.items()):
            unshipped.append(str(m.path.relative_to(ROOT)))
    assert not unshipped, f"not in a listed package nor in package-data: {unshipped}"


def _is_package_data(path: Path, package: str, globs: list[str]) -> bool:
    folder = _folder_of(package)
    if not path.is_relative_to(folder):
        return False
    rel = path.relative_to(folder).as_posix()
    return any(fnmatch.fnmatch(rel, g) for g in globs)


def _folder_of(package: str) -> Path:
    """Where a package's files are: its nearest mapped ancestor's folder, then its parts."""
    parts = package.split(".")
    for end in range(len(parts), 0, -1):
        mapped = PACKAGE_DIRS.get(".".join(parts[:end]))
        if mapped is not None:
            return ROOT / mapped / Path(*parts[end:])
    raise AssertionError(f"{package} is under no package-dir of pyproject.toml")
