"""`exgra-med prepare <dataset>` dispatches to the data set's module."""

from __future__ import annotations

import json

import pytest

from exgra_med.data import prepare


def test_dispatches_to_easy_vqa(tmp_path, capsys):
    assert prepare.main(["easy-vqa", "--out", str(tmp_path), "--max-images", "2"]) == 0
    assert "train" in capsys.readouterr().out
    assert json.loads((tmp_path / "test.json").read_text())


def test_unknown_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        prepare.main(["nope"])
    assert info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_missing_module_gives_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(prepare.DATASETS, "ghost", "ghost_module_that_does_not_exist")
    assert prepare.main(["ghost"]) == 2
    assert "'ghost' is not available" in capsys.readouterr().err


def test_help_of_a_dataset_reaches_its_parser(capsys):
    with pytest.raises(SystemExit) as info:
        prepare.main(["easy-vqa", "--help"])
    assert info.value.code == 0 and "--max-images" in capsys.readouterr().out
