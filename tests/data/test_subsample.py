"""Seeded fraction and few-shot subsets (`exgra-med subsample`)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from exgra_med.data.prepare.subsample import main, subsample_fraction, subsample_shots


def _rec(i, kind, answer):
    return {"id": i, "answer_type": kind, "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]}


RECORDS = [_rec(i, "CLOSED" if i % 3 == 0 else "OPEN", ["yes", "no", "Lung", "lung", "liver"][i % 5])
           for i in range(30)]


def test_fraction_is_seeded_ordered_and_keeps_one():
    a = subsample_fraction(RECORDS, 0.1, seed=7)
    assert a == subsample_fraction(RECORDS, 0.1, seed=7)
    assert len(a) == 3 and [r["id"] for r in a] == sorted(r["id"] for r in a)
    assert a != subsample_fraction(RECORDS, 0.1, seed=8)
    assert len(subsample_fraction(RECORDS, 0.01, seed=0)) == 1  # floor(0.3) -> at least 1
    assert len(subsample_fraction(RECORDS, 0.55, seed=0)) == 16  # floor(16.5)
    assert subsample_fraction(RECORDS, 1.0, seed=0) == RECORDS
    with pytest.raises(ValueError, match="fraction"):
        subsample_fraction(RECORDS, 0.0, seed=0)


def test_shots_per_answer_type_and_per_answer():
    by_type = subsample_shots(RECORDS, 4, seed=1)
    assert Counter(r["answer_type"] for r in by_type) == {"OPEN": 4, "CLOSED": 4}
    by_answer = subsample_shots(RECORDS, 2, seed=1, per="answer")
    # "Lung" and "lung" are one group: yes, no, lung, liver -> 4 groups x 2
    assert Counter(r["conversations"][-1]["value"].lower() for r in by_answer) == {
        "yes": 2, "no": 2, "lung": 2, "liver": 2}
    assert subsample_shots(RECORDS[:2], 5, seed=0) == RECORDS[:2]  # small groups kept whole
    with pytest.raises(ValueError, match=r"record 0 \(id 0\) lacks field 'answer_type'"):
        subsample_shots([{"id": 0}], 1, seed=0)


def test_cli(tmp_path, capsys):
    src, dst = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(RECORDS))
    assert main(["--in", str(src), "--out", str(dst), "--fraction", "0.2", "--seed", "3"]) == 0
    assert json.loads(dst.read_text()) == subsample_fraction(RECORDS, 0.2, seed=3)
    assert "kept 6 of 30" in capsys.readouterr().out
    main(["--in", str(src), "--out", str(dst), "--shots", "1", "--per", "answer_type"])
    assert len(json.loads(dst.read_text())) == 2
