"""Seeded fraction and few-shot subsets (`exgra-med subsample`)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from exgra_med.data.prepare.subsample import balance_yes_no, main, subsample_fraction, subsample_shots


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


def test_balance_yes_no_equalises_each_question_and_keeps_open_records():
    def rec(i, question, answer):
        return {"id": i, "image": "a.png", "answer_type": "CLOSED" if answer in ("yes", "no") else "OPEN",
                "conversations": [{"from": "human", "value": f"{question}\n<image>"}, {"from": "gpt", "value": answer}]}

    records = [rec(i, "Is there a red shape?", "no") for i in range(7)] + [rec(7, "Is there a red shape?", "yes")]
    records += [rec(10 + i, "Is there not a circle?", a) for i, a in enumerate(["yes", "yes", "No", "no", "yes"])]
    records += [rec(20, "Is it blue?", "yes"), rec(21, "What color is it?", "red"), rec(22, "What shape?", "circle")]
    subset = balance_yes_no(records, seed=0)
    ids = [r["id"] for r in subset]
    assert ids == sorted(ids)  # input order
    assert 7 in ids and sum(i < 7 for i in ids) == 1  # 1 yes -> 1 of the 7 no
    assert {10, 11, 14} & set(ids) and len({10, 11, 14} & set(ids)) == 2 and {12, 13} <= set(ids)
    assert 20 not in ids  # asked with one answer only: nothing to balance it with
    assert {21, 22} <= set(ids)
    assert balance_yes_no(records, seed=0) == subset and balance_yes_no(records, seed=1) != subset
