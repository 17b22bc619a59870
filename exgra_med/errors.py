"""User mistakes vs. bugs: the one exception type that commands raise for bad input, and how the CLI tells them apart.

`UserError` (a `ValueError`) is raised for what the user can fix: a missing file, a malformed record, a bad flag
value. The `exgra-med` dispatcher prints such errors as one line and exits with `USER_ERROR_EXIT_CODE`; anything
else is treated as a bug and shown with its traceback. `--debug` (or `EXGRA_MED_DEBUG=1`) always shows tracebacks.
Every command's `--help` is formatted by `HelpFormatter`, so that each option shows its default once.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

USER_ERROR_EXIT_CODE = 2
_PACKAGE_DIR = Path(__file__).resolve().parent


class UserError(ValueError):
    """Bad input the user can fix; the message names the file, record, field or flag."""


# Standard exceptions that, wherever they come from, mean "the path you gave does not work".
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def _raised_in_package(error: BaseException) -> bool:
    """True when the innermost frame of `error`'s traceback is this package's code (a deliberate check), not a
    third-party library's."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE_DIR)
    except ValueError:
        return False
    return True


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is a user mistake: a `UserError`, a path error, or a `ValueError` this package raised itself
    (its own input checks). Errors from libraries and other exception types are bugs."""
    if isinstance(error, (UserError, *_PATH_ERRORS)):
        return True
    return type(error) is ValueError and _raised_in_package(error)


def debug_requested() -> bool:
    """`EXGRA_MED_DEBUG` set to a non-empty value other than 0/false."""
    return os.environ.get("EXGRA_MED_DEBUG", "").lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (`FileNotFoundError` without its errno prefix)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


# A help text that states its default in its own words ("default: the checkpoint's", "env X, default 6").
_STATES_DEFAULT = re.compile(r"\bdefaults?\b|%\(default\)", re.IGNORECASE)
_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                 argparse._CountAction, argparse._HelpAction, argparse._VersionAction)


def shows_default(action: argparse.Action) -> bool:
    """Whether `action`'s default means something to show: not None, False, empty or SUPPRESS, not an on/off flag's,
    not a required positional's."""
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS or isinstance(action, _FLAG_ACTIONS):
        return False
    if isinstance(default, (str, list, tuple, dict)) and not default:
        return False
    return bool(action.option_strings) or action.nargs in ("?", "*")


class HelpFormatter(argparse.HelpFormatter):
    """The `--help` formatter of every command: argparse's, with " (default: X)" after the help of each option whose
    default means something (`shows_default`) and whose help does not already state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _STATES_DEFAULT.search(text) or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)"
