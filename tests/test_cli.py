"""The `exgra-med` dispatcher: every registered command imports and answers --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exgra_med.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_exits_2(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "exgra_med.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip()
