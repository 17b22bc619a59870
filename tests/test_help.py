"""`--help` of every command and subcommand, formatted by the one `exgra_med.errors.HelpFormatter`: no option states
its default twice, and every option with a default that means something shows it. The parsers are captured in
process (each command's `main(["--help"])` stops where it would parse), not run as subprocesses."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from exgra_med.cli import COMMANDS
from exgra_med.data.prepare import DATASETS
from exgra_med.errors import HelpFormatter

COMMAND_TARGETS = {name: target for name, (target, _) in COMMANDS.items()}
COMMAND_TARGETS.update({f"prepare {name}": f"exgra_med.data.prepare.{module}:main"
                        for name, module in DATASETS.items()})
# Defaults that say nothing: a flag's on/off state, an unset value.
ON_OFF = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._CountAction,
          argparse._HelpAction, argparse._VersionAction)
NO_HELP_ENTRY = (argparse._HelpAction, argparse._VersionAction)
MENTION = re.compile(r"\bdefaults?\b", re.IGNORECASE)
APPENDED = re.compile(r"\(default: [^()]*(\([^()]*\)[^()]*)*\)$")


class _Parsed(Exception):
    pass


def command_parser(target: str) -> argparse.ArgumentParser:
    """The parser `module:function` builds, captured when it is about to parse `--help`."""
    module, function = target.split(":")
    main = getattr(importlib.import_module(module), function)
    captured: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise _Parsed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        with pytest.raises(_Parsed):
            main(["--help"])
    return captured[0]


def all_parsers(parser: argparse.ArgumentParser, prog: str):
    """`parser` and its subcommands' parsers, as (prog, parser)."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{prog} {name}")


def help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's entry in the `--help` text (its flags line and help, white space collapsed), by first flag."""
    entries = {}
    for chunk in re.split(r"\n(?=  -)", parser.format_help()):
        match = re.match(r"\s+(-[\w-]+)", chunk)
        if match:
            section_end = re.search(r"\n\S", chunk)  # the next section's title ends the entry
            entries[match[1]] = " ".join((chunk[: section_end.start()] if section_end else chunk).split())
    return entries


def has_meaningful_default(action: argparse.Action) -> bool:
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS or isinstance(action, ON_OFF):
        return False
    return not (isinstance(default, (str, list, tuple)) and not default)


@pytest.mark.parametrize("command", sorted(COMMAND_TARGETS))
def test_help_shows_each_default_once(command):
    problems = []
    for prog, parser in all_parsers(command_parser(COMMAND_TARGETS[command]), command):
        assert parser.formatter_class is HelpFormatter, f"{prog}: not formatted by errors.HelpFormatter"
        entries = help_entries(parser)
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, NO_HELP_ENTRY):
                continue
            entry = entries[action.option_strings[0]]
            mentions = len(MENTION.findall(entry))
            if APPENDED.search(entry) and mentions > 1:
                problems.append(f"{prog} {action.option_strings[0]}: default stated twice: {entry}")
            if has_meaningful_default(action) and not mentions:
                problems.append(f"{prog} {action.option_strings[0]}: default {action.default!r} not shown: {entry}")
    assert not problems, "\n".join(problems)


def test_formatter_appends_only_what_the_help_does_not_say():
    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--size", type=int, default=8, help="rows at once")
    parser.add_argument("--template", default=None, help="template (default: the checkpoint's)")
    parser.add_argument("--retries", type=int, default=3, help="attempts (env X, default 3)")
    parser.add_argument("--out", default=None, help="output file")
    parser.add_argument("--fast", action="store_true", help="skip checks")
    parser.add_argument("--name", default="", help="a name")
    entries = help_entries(parser)
    assert entries["--size"].endswith("rows at once (default: 8)")
    assert entries["--template"].endswith("template (default: the checkpoint's)")
    assert entries["--retries"].endswith("attempts (env X, default 3)")
    assert entries["--out"].endswith("output file")
    assert entries["--fast"].endswith("skip checks")
    assert entries["--name"].endswith("a name")
