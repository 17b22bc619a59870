"""YAML recipes for `exgra-med train`: `exgra-med train recipes/stage1.yaml [--flag value ...]`.

A recipe is a flat YAML mapping of trainer flags (the names `exgra-med train --help` lists, without `--`). Flags
given after the recipe override it. The resolved recipe (the file's values with the overrides applied, plus any
other flag given) is written to `OUTPUT_DIR/train_recipe.yaml`, so that every run folder says how it was made and
`exgra-med train OUTPUT_DIR/train_recipe.yaml` repeats it. The paper's runs ship as files in `recipes/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

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
    if values is None or values == {}:
        raise RecipeError(f"{path}: the recipe is empty; a recipe is a mapping of trainer flags (see "
                          "`exgra-med train --help`)")
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of trainer flags, found a {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise RecipeError(f"{path}: unknown trainer flag(s) {unknown} (see `exgra-med train --help`)")
    return values


_SCALAR_TYPES = {int: "an integer", float: "a number", string_to_bool: "true or false"}


def check_recipe_value(path: str | Path, name: str, value: Any, action: argparse.Action) -> None:
    """Refuse (RecipeError naming the file and key) a recipe value that the flag's own type or choices would refuse
    on the command line: a list for a one-number flag, 'abc' for a float, 1.5 for an integer, an unknown choice."""
    expected = _SCALAR_TYPES.get(action.type)
    if action.choices:
        expected = "one of " + ", ".join(str(c) for c in action.choices)
    if expected is None or value is None or action.nargs not in (None, "?"):
        return  # strings, lists and structured flags (report_to, fsdp_config, ...) are left to the dataclasses
    if isinstance(value, (list, dict)):
        raise RecipeError(f"{path}: {name}: expected one value, got a {type(value).__name__} ({expected})")
    try:
        converted = action.type(value if isinstance(value, str) else str(value)) if action.type else value
        valid = not action.choices or converted in action.choices
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        valid = False
    if not valid:
        raise RecipeError(f"{path}: {name}: invalid value {value!r} (expected {expected})")


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
        path = argv.pop(0)
        recipe = read_recipe(path, set(dests))
        for name, value in recipe.items():
            check_recipe_value(path, name, value, dests[name])
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

