"""Package layering: model/, align/ and data/ are libraries and import nothing from the applications built on
them (train/, eval/, serve/), at module level or inside functions, absolutely or relatively."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "exgra_med"
LIBRARIES = ("model", "align", "data")
APPLICATIONS = ("exgra_med.train", "exgra_med.eval", "exgra_med.serve")


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
