"""YAML recipes for `exgra-med train`: `exgra-med train recipes/stage1.yaml [--flag value ...]`.

A recipe is a flat YAML mapping of trainer flags (the names `exgra-med train --help` lists, without `--`). Flags
given after the recipe override it. The resolved recipe (the file's values with the overrides applied, plus any
other flag given) is written to `OUTPUT_DIR/train_recipe.yaml`, so that every run folder says how it was made and
`exgra-med train OUTPUT_DIR/train_recipe.yaml` repeats it. The paper's runs ship as files in `recipes/`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from exgra_med.errors import UserError
from exgra_med.io import atomic_file

RECIPE_SUFFIXES = (".yaml", ".yml")
RESOLVED_RECIPE = "train_recipe.yaml"


class RecipeError(UserError):
    """A recipe file that cannot be read or names an unknown flag."""


def read_recipe(path: str | Path, known: set[str]) -> dict[str, Any]:
    """The flags of a recipe file; raises RecipeError naming the file (and the key) when it is not a mapping of
    known flags."""

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from e
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of trainer flags, found a {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise RecipeError(f"{path}: unknown trainer flag(s) {unknown} (see `exgra-med train --help`)")
    return values


def _plain(value: Any) -> Any:
    """A YAML-safe copy of a parsed flag value (enums as their value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def parse_with_recipe(
    parser: HfArgumentParser, argv: Sequence[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(the parser's dataclasses, resolved recipe) for `argv`, whose first item may be a recipe file.

    The resolved recipe holds the recipe's flags and every flag given on the command line, with their final values.
    """
    argv = list(argv)
    recipe: dict[str, Any] = {}
    dests = {a.dest: a for a in parser._actions if a.dest != "help"}
    if argv and argv[0].endswith(RECIPE_SUFFIXES):
        recipe = read_recipe(argv.pop(0), set(dests))
        for name, value in recipe.items():
            # A recipe value is the flag's new default (a string is converted as on the command line), and a
            # flag the recipe sets is no longer required on the command line.
            dests[name].default = value
            dests[name].required = False
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")  # usage + one line, exit code 2
    given = {a.dest for a in parser._actions if any(opt in argv for opt in a.option_strings)}
    given |= {arg.split("=", 1)[0][2:] for arg in argv if arg.startswith("--") and "=" in arg}
    resolved = {name: _plain(getattr(namespace, name)) for name in dests if name in recipe or name in given}
    outputs = []
    for dtype in parser.dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in keys}))
    return tuple(outputs), resolved


def write_resolved_recipe(resolved: dict[str, Any], output_dir: str | Path, source: str | None = None) -> Path:
    """Write `resolved` as `OUTPUT_DIR/train_recipe.yaml` (atomically)."""

    path = Path(output_dir) / RESOLVED_RECIPE
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved `exgra-med train` recipe" + (f" (from {source})" if source else "") + "; rerun with\n"
    header += f"#   exgra-med train {path}\n"
    with atomic_file(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    return path

