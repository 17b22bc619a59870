"""Package layering: every package of exgra_med imports only the packages below it (`ALLOWED`), at module level or
inside functions, absolutely or relatively, so that no two packages import each other. The libraries (align, data,
model) import none of the applications built on them (train, eval, serve)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "exgra_med"
LIBRARIES = ("model", "align", "data")
APPLICATIONS = ("exgra_med.train", "exgra_med.eval", "exgra_med.serve")
FRAME = {"constants", "errors", "io", "conversation"}
# What each top-level package or module of exgra_med may import (besides itself). A new package needs a line here.
ALLOWED: dict[str, set[str]] = {
    "__init__": {"model"},  # the Auto-class registration
    "constants": set(),
    "errors": set(),
    "io": {"errors"},
    "conversation": {"constants"},
    "align": set(),
    "llm_client": FRAME,
    "data": FRAME | {"llm_client"},
    "model": FRAME | {"align", "data"},
    "eval": FRAME | {"data", "model", "llm_client"},
    "train": FRAME | {"align", "data", "model", "eval", "cli"},  # cli: `python -m exgra_med.train`'s error handling
    "serve": FRAME | {"data", "model", "eval"},
    "cli": {"errors", "model"},  # model: the registration the console script defers
}


def module_name(file: Path, root: Path = PACKAGE_ROOT) -> str:
    """Dotted name of a .py file inside the package (`exgra_med/model/__init__.py` -> `exgra_med.model`)."""
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every dotted name an import statement anywhere in `source` (module `module`) refers to, relative imports
    resolved; `from a import b` yields both `a` and `a.b`, since b may be a submodule."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def forbidden(names: set[str]) -> list[str]:
    """The names that are, or lie inside, an application package."""
    return sorted(n for n in names if any(n == app or n.startswith(app + ".") for app in APPLICATIONS))


SNIPPET = '''
import os
import exgra_med.serve.loading
from exgra_med import eval
from exgra_med.model import checkpoint

def late():
    from ..train.args import ModelArguments
    from .. import serve
    from .vision import load_vision_tower
'''


def test_the_checker_sees_every_kind_of_import():
    names = imported_names(SNIPPET, "exgra_med.model.lora")
    assert forbidden(names) == [
        "exgra_med.eval", "exgra_med.serve", "exgra_med.serve.loading", "exgra_med.train.args",
        "exgra_med.train.args.ModelArguments",
    ]
    assert "exgra_med.model.vision.load_vision_tower" in names and "exgra_med.model.checkpoint" in names
    # In a package's __init__, one dot is the package itself.
    assert "exgra_med.model.serve" in imported_names("from .serve import x", "exgra_med.model", is_package=True)
    assert forbidden({"exgra_med.trainer_utils", "exgra_med.evaluate"}) == []


def _library_files() -> list[Path]:
    return sorted(f for lib in LIBRARIES for f in (PACKAGE_ROOT / lib).rglob("*.py"))


def test_there_are_library_files_to_check():
    assert len(_library_files()) > 10


@pytest.mark.parametrize("file", _library_files(), ids=lambda f: str(f.relative_to(PACKAGE_ROOT)))
def test_library_imports_no_application(file):
    names = imported_names(file.read_text(encoding="utf-8"), module_name(file), file.name == "__init__.py")
    assert forbidden(names) == [], f"{file} imports {forbidden(names)}: move the shared code into the library"


def _top(name: str) -> str | None:
    """The top-level package or module of exgra_med a dotted name lies in."""
    parts = name.split(".")
    return parts[1] if parts[0] == "exgra_med" and len(parts) > 1 else None


def package_imports() -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages of exgra_med it imports anywhere."""
    edges: dict[str, set[str]] = {}
    for file in sorted(PACKAGE_ROOT.rglob("*.py")):
        module = module_name(file)
        own = _top(module) or "__init__"
        names = imported_names(file.read_text(encoding="utf-8"), module, file.name == "__init__.py")
        found = {_top(n) for n in names} - {None, own}
        if own == "__init__":
            found -= {"__version__"}
        edges.setdefault(own, set()).update(found)
    return edges


def _names_only(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    # `from exgra_med import x` names attributes too; keep the names that are packages or modules.
    known = {p.stem if p.is_file() else p.name for p in PACKAGE_ROOT.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").is_file()}
    return {k: {v for v in vs if v in known} for k, vs in edges.items()}


def test_every_package_is_in_the_rules():
    assert set(package_imports()) <= set(ALLOWED), f"add {set(package_imports()) - set(ALLOWED)} to ALLOWED"
    assert {"model", "data", "train", "eval", "serve", "align", "llm_client"} <= set(package_imports())


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below(package):
    found = _names_only(package_imports()).get(package, set())
    assert found <= ALLOWED[package], f"exgra_med.{package} imports {sorted(found - ALLOWED[package])}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph `edges` (as the list of its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_the_cycle_finder():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_no_import_cycle_between_packages():
    assert find_cycle(_names_only(package_imports())) is None


LAZY_MARK = "# lazy:"


def unmarked_function_imports(source: str) -> list[int]:
    """Line numbers of imports inside functions that carry no `# lazy: <reason>`, on their own line or above the run
    of imports they belong to: an import is deferred only on purpose (an optional extra, the start-up time of light
    commands, an import cycle)."""
    lines = source.splitlines()
    imports = [sub for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]
    spans = {line for sub in imports for line in range(sub.lineno, sub.end_lineno + 1)}
    found = set()
    for sub in imports:
        if LAZY_MARK in lines[sub.lineno - 1]:
            continue
        above = sub.lineno - 1
        while above in spans:  # up through the run of imports this one belongs to
            above -= 1
        if not (above >= 1 and lines[above - 1].strip().startswith(LAZY_MARK)):
            found.add(sub.lineno)
    return sorted(found)


def test_the_lazy_import_checker_finds_unmarked_imports():
    source = ("import os\n\ndef f():\n    import json\n    # lazy: optional extra\n    import yaml\n"
              "    from a import (\n        b,\n    )\n    import toml  # lazy: optional extra\n\n"
              "    import csv\n\nclass A:\n    def g(self):\n        import csv\n")
    assert unmarked_function_imports(source) == [4, 12, 16]


@pytest.mark.parametrize("file", sorted(PACKAGE_ROOT.rglob("*.py")), ids=lambda f: str(f.relative_to(PACKAGE_ROOT)))
def test_function_level_imports_are_deliberate_and_marked(file):
    lines = unmarked_function_imports(file.read_text(encoding="utf-8"))
    assert not lines, (f"{file}: imports inside functions at lines {lines}; import at the top of the module, or say "
                       f"why it must wait with '{LAZY_MARK} <reason>'")
