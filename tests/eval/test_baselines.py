"""Majority-answer and question-prior baselines on a hand-made fixture with hand-computed scores."""

from __future__ import annotations

import json

import pytest

from exgra_med.eval.baselines import (
    compare,
    format_comparison,
    main,
    majority_answers,
    majority_predictions,
    question_prior_predictions,
)

SUFFIX = ' (Answer with either "Yes" or "No").\n<image>'


def _rec(rid, question, answer, kind):
    return {"id": rid, "image": "x.png", "answer_type": kind,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


TRAIN = [
    _rec(1, "Is there a circle?" + SUFFIX, "Yes", "CLOSED"),
    _rec(2, "Is there a circle?" + SUFFIX, "yes", "CLOSED"),
    _rec(3, "Is there a square?" + SUFFIX, "no", "CLOSED"),
    _rec(4, "What color is the shape?\n<image>", "red", "OPEN"),
    _rec(5, "What color is the shape?\n<image>", "red", "OPEN"),
    _rec(6, "What color is the shape?\n<image>", "blue", "OPEN"),
    _rec(7, "What shape is it?\n<image>", "circle", "OPEN"),
]
TEST = [
    _rec("t1", "is there a circle?" + SUFFIX, "yes", "CLOSED"),  # case differs from training
    _rec("t2", "Is there a square?" + SUFFIX, "no", "CLOSED"),
    _rec("t3", "What color is the shape?\n<image>", "blue", "OPEN"),
    _rec("t4", "What shape is it?\n<image>", "circle", "OPEN"),
    _rec("t5", "What is never seen?\n<image>", "red", "OPEN"),
]
CANDIDATES = {"0": ["red", "blue", "circle"]}
MODEL = {"t1": "yes", "t2": "yes", "t3": "blue", "t4": "a red circle", "t5": "green"}


def test_majority_and_question_prior_predictions():
    assert majority_answers(TRAIN) == {"CLOSED": "yes", "OPEN": "red"}  # "Yes"/"yes" count together
    assert majority_predictions(TRAIN, TEST) == {"t1": "yes", "t2": "yes", "t3": "red", "t4": "red", "t5": "red"}
    # t3: red (2) beats blue (1); t5: unseen question -> majority of OPEN.
    assert question_prior_predictions(TRAIN, TEST) == {
        "t1": "yes",
        "t2": "no",
        "t3": "red",
        "t4": "circle",
        "t5": "red",
    }


def test_ties_go_to_the_answer_seen_first():
    train = [
        _rec(1, "Q?", "b", "OPEN"),
        _rec(2, "Q?", "a", "OPEN"),
        _rec(3, "Q?", "a", "OPEN"),
        _rec(4, "Q?", "b", "OPEN"),
    ]
    assert majority_answers(train) == {"OPEN": "b"}


def test_comparison_table_values():
    rows = compare(TRAIN, TEST, MODEL, CANDIDATES)
    # model: closed 1/2; open recall t3 1, t4 1 ("circle" found), t5 0 -> 2/3.
    assert rows["model"] == pytest.approx({"closed_accuracy": 50.0, "recall": 200 / 3, "average": 175 / 3})
    # majority: closed 1/2; open recall t3 0, t4 0, t5 1 -> 1/3.
    assert rows["majority answer"] == pytest.approx({"closed_accuracy": 50.0, "recall": 100 / 3, "average": 125 / 3})
    # question prior: closed 2/2; open recall t3 0, t4 1, t5 1 -> 2/3.
    assert rows["question prior"] == pytest.approx({"closed_accuracy": 100.0, "recall": 200 / 3, "average": 250 / 3})
    table = format_comparison(rows).splitlines()
    assert table[0] == "| system | overall | closed | open |"
    assert table[2] == "| model | 58.33 | 50.00 | 66.67 |"
    assert table[4] == "| question prior | 83.33 | 100.00 | 66.67 |"


def test_cli_prints_the_table(tmp_path, capsys):
    paths = {}
    for name, obj in (("train", TRAIN), ("test", TEST), ("candidate", CANDIDATES)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    pred = tmp_path / "answers.jsonl"
    pred.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in MODEL.items()))
    argv = ["--train", str(paths["train"]), "--test", str(paths["test"]), "--candidate", str(paths["candidate"])]
    assert main([*argv, "--pred", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "5 test questions (2 closed, 3 open)" in out
    assert "| majority answer | 41.67 | 50.00 | 33.33 |" in out
    assert main(argv) == 0
    assert "| model |" not in capsys.readouterr().out
