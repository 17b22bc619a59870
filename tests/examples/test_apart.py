"""examples/ stays apart from the library: no module of the installed package imports it (or benchmarks/), and the
package build leaves it out."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = ("examples", "benchmarks")


def _imported_top_levels(source: str) -> set[str]:
    """The first component of every absolute import in `source`, function-level ones included."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_checker_sees_function_level_imports():
    source = "import os\n\ndef late():\n    from examples.easy_vqa import tower\n    import benchmarks.bench_align\n"
    assert _imported_top_levels(source) == {"os", "examples", "benchmarks"}


def test_the_library_imports_neither_examples_nor_benchmarks():
    files = sorted((REPO / "exgra_med").rglob("*.py"))
    assert len(files) > 50
    offenders = {
        str(f.relative_to(REPO)): sorted(_imported_top_levels(f.read_text()) & set(OUTSIDE)) for f in files
    }
    assert {f: names for f, names in offenders.items() if names} == {}


def test_the_package_build_leaves_examples_out():
    find = re.search(r"^\[tool\.setuptools\.packages\.find\]\n(.*)$", (REPO / "pyproject.toml").read_text(), re.M)
    assert find and find.group(1) == 'include = ["exgra_med*"]'
    assert (REPO / "examples" / "__init__.py").is_file()  # `python -m examples.easy_vqa...` from the repository root
