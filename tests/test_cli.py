"""The `exgra-med` dispatcher: every registered command imports and answers --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exgra_med.cli import COMMANDS, LIGHT_COMMANDS, main


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


# The installed console script (next to the interpreter): what users run.
EXGRA_MED = str(Path(sys.executable).parent / "exgra-med")


def test_console_script_is_installed():
    proc = subprocess.run([EXGRA_MED, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip()


def test_light_commands_start_without_torch_and_the_others_register_the_model():
    """The console script runs subsample, score, ... without importing torch and transformers (exgra_med/__init__.py
    leaves the Auto-class registration to the commands that load models); `import exgra_med` elsewhere registers
    (tests/model/test_auto_classes.py)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPROFILEIMPORTTIME="1")

    def imported(*argv: str) -> set[str]:
        command = [sys.executable, *argv] if argv[0] == "-m" else [EXGRA_MED, *argv]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}

    for name in sorted(LIGHT_COMMANDS):
        modules = imported(name, "--help")
        assert "exgra_med.cli" in modules and not {"torch", "transformers", "exgra_med.model"} & modules, name
    assert {"transformers", "exgra_med.model"} <= imported("generate-vqa", "--help")
    # `python -m exgra_med.cli` (how scripts/ call the light commands) alike.
    modules = imported("-m", "exgra_med.cli", "merge-extended", "--help")  # (the module runs as __main__)
    assert "exgra_med.errors" in modules
    assert not {"torch", "transformers", "exgra_med.model"} & modules


def _run(*argv: str, env_debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("EXGRA_MED_DEBUG", None)
    if env_debug:
        env["EXGRA_MED_DEBUG"] = "1"
    return subprocess.run([EXGRA_MED, *argv], capture_output=True, text=True, env=env)


def test_user_mistakes_end_in_one_line_and_exit_2(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"id": 1,}]')
    dupes = tmp_path / "dupes.json"
    dupes.write_text('[{"id": 1, "conversations": [{"from": "human", "value": "q"}]}, '
                     '{"id": 1, "conversations": [{"from": "human", "value": "q"}]}]')
    records = tmp_path / "records.json"
    records.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "q"}, '
                       '{"from": "gpt", "value": "a"}]}]')
    cases = [
        (["subsample", "--in", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.json"), "--fraction", "0.5"],
         "missing.json"),
        (["subsample", "--in", str(bad_json), "--out", str(tmp_path / "o.json"), "--fraction", "0.5"],
         "invalid JSON at line 1"),
        (["subsample", "--in", str(records), "--out", str(tmp_path / "o.json"), "--fraction", "3"],
         "fraction must be in (0, 1]"),
        (["generate-vqa", "--model", str(tmp_path), "--question-file", str(dupes), "--answers-file",
          str(tmp_path / "a.jsonl")], "repeats id 1"),
        (["generate-vqa", "--model", str(tmp_path / "nope"), "--question-file", str(dupes), "--answers-file",
          str(tmp_path / "a.jsonl")], "--model"),
    ]
    for argv, expected in cases:
        # The light commands start in a fraction of a second: through the console script, as users run them. The
        # model commands import torch and transformers (seconds per process): in process, the same `main`.
        if argv[0] in LIGHT_COMMANDS:
            proc = _run(*argv)
            code, err = proc.returncode, proc.stderr
        else:
            code, err = main(argv), capsys.readouterr().err
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"exgra-med {argv[0]}: error: ") and expected in lines[0], lines[0]
    # --debug (or EXGRA_MED_DEBUG=1) shows the traceback.
    proc = _run("--debug", *cases[1][0])
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "Traceback" in _run(*cases[1][0], env_debug=True).stderr


def _main_exit_code(argv: list[str]) -> int:
    """`main(argv)`'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv", [
    ["generate-vqa", "--model", "m", "--question-file", "q", "--answers-file", "a", "--conv-mode", "x"],
    ["train", "--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", "--no_such_flag"],
    ["train", "--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", "--conv_template", "nope"],
])
def test_argparse_mistakes_exit_2_with_usage(argv, capsys):
    assert _main_exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"usage: exgra-med {argv[0]}"), err
    if "--no_such_flag" in argv:
        assert err.strip().endswith("unrecognized arguments: --no_such_flag")


def test_an_argparse_mistake_through_the_console_script_exits_2_with_usage():
    proc = _run("subsample", "--in", "a.json", "--out", "b.json", "--fraction", "0.5", "--no_such_flag")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: exgra-med subsample"), proc.stderr
    assert proc.stderr.strip().endswith("unrecognized arguments: --no_such_flag") and "Traceback" not in proc.stderr


def test_help_shows_defaults(capsys):
    assert _main_exit_code(["generate-vqa", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "only matters with --temperature > 0 (default: 0)" in text  # --seed


def test_a_real_bug_keeps_its_traceback(monkeypatch, capsys):
    from exgra_med.cli import run_command

    def broken(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_command(broken, [], "exgra-med x")

    def library_error(argv):  # a ValueError raised outside exgra_med (here: this test file) is not a user's check
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        run_command(library_error, [], "exgra-med x")

    def checks(argv):
        from exgra_med.errors import UserError

        raise UserError("--thing must be\npositive")

    assert run_command(checks, [], "exgra-med x") == 2
    assert capsys.readouterr().err == "exgra-med x: error: --thing must be positive\n"


def test_chat_errors_carry_the_error_prefix(tiny_model_dir, tmp_path, capsys):
    for argv in (["chat", "--model", str(tmp_path / "no_model")],
                 ["chat", "--model", str(tiny_model_dir), "--device", "cpu", "--image", str(tmp_path / "no.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("exgra-med chat: error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["web", "serve-api"])
def test_server_load_errors_carry_the_error_prefix(command, tmp_path, capsys):
    assert main([command, "--model", str(tmp_path / "no_model")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"exgra-med {command}: error: ") and "Traceback" not in err, err
