"""examples/easy_vqa/rationale.py: the demo's fine-tuning answers, the comparison worked out in words."""

from __future__ import annotations

import json

import pytest

from examples.easy_vqa.rationale import (
    RATIONALE_WORDS,
    main,
    parse_rationale,
    rationale_answer,
    rationale_train_records,
)
from exgra_med.data.prepare.easy_vqa import COLORS, SHAPES, image_facts
from exgra_med.data.records import load_records


def test_rationale_answer_works_the_comparison_out_in_words():
    facts = image_facts([("what is the blue shape?", "circle")])
    cases = {
        ("is there a blue shape?", "yes"): "blue blue same present yes",
        ("is there a red shape?", "no"): "red blue different present no",
        ("is there not a blue shape?", "no"): "blue blue same absent no",
        ("does the image not contain a triangle?", "yes"): "triangle circle different absent yes",
        ("is there no circle?", "No"): "circle circle same absent no",
    }
    for (question, answer), expected in cases.items():
        assert rationale_answer(question, answer, facts) == expected
    assert rationale_answer("is there a blue circle?", "yes", facts) is None  # names two words
    assert rationale_answer("is there a red shape?", "yes", facts) is None  # contradicts the facts
    assert rationale_answer("is there a circle?", "yes", image_facts([])) is None  # shape unknown
    assert rationale_answer("what color is the shape?", "blue", facts) is None  # not yes/no
    assert rationale_answer("is there a red shape?", "no", facts, "{seen} , {answer}") == "blue , no"
    # the reference's closed rule (substring) scores the final word only: no word before it holds "yes" or "no"
    from exgra_med.eval.metrics import closed_hit

    for word in RATIONALE_WORDS + COLORS + SHAPES:
        assert "yes" not in word and "no" not in word
    assert closed_hit("red blue different absent yes", "no") == 0.0
    assert closed_hit("red blue different absent yes", "yes") == 1.0
    assert parse_rationale("Red blue different absent yes") == {
        "asked": "red", "seen": "blue", "comparison": "different", "mode": "absent", "answer": "yes"}
    assert parse_rationale("red , blue , same , present , no")["comparison"] == "same"  # commas accepted
    assert parse_rationale("blue") is None and parse_rationale("red blue same present no no") is None


def test_rationale_train_records_balance_yes_no_and_keep_a_share_of_open_questions():
    from exgra_med.data.prepare.vqa import make_vqa_record

    records = [make_vqa_record(f"o{i}", "a.png", "What color is the shape?", "blue", "OPEN") for i in range(8)]
    records += [make_vqa_record("s", "a.png", "What shape is it?", "circle", "OPEN")]
    records += [make_vqa_record(f"r{i}", f"{'a' if i < 5 else 'b'}.png", "Is there a red shape?", "no", "CLOSED")
                for i in range(6)]
    records += [make_vqa_record("y", "c.png", "Is there a red shape?", "yes", "CLOSED"),
                make_vqa_record("n", "a.png", "Is there not a circle?", "no", "CLOSED")]  # only "no": dropped
    out = rationale_train_records(records, seed=0, open_fraction=0.5)
    closed = [r for r in out if r["answer_type"] == "CLOSED"]
    # one "yes" for "is there a red shape?", so one of its six "no" kept; c.png's colour is known from its answer
    assert sorted(r["conversations"][1]["value"] for r in closed)[1] == "red red same present yes"
    assert len(closed) == 2 and [r["id"] for r in closed if r["id"] != "y"][0] in {f"r{i}" for i in range(6)}
    no = next(r for r in closed if r["id"] != "y")
    assert no["conversations"][1]["value"] == ("red blue different present no" if no["image"] == "a.png"
                                               else "no")  # b.png's colour is unknown: answer kept
    assert sum(r["answer_type"] == "OPEN" for r in out) == 4  # round(0.5 * 9)
    order = [[r["id"] for r in records].index(r["id"]) for r in out]
    assert order == sorted(order)  # input order
    assert out == rationale_train_records(records, seed=0, open_fraction=0.5)
    assert records[9]["conversations"][1]["value"] == "no"  # the input is not modified
    with pytest.raises(ValueError, match="open_fraction"):
        rationale_train_records(records, seed=0, open_fraction=1.5)


def test_cli_writes_the_demo_fine_tuning_file_from_a_prepared_train_json(tmp_path, capsys):
    from exgra_med.data.prepare.easy_vqa import prepare

    prepare(tmp_path, max_images=12, seed=1)
    out = tmp_path / "train_rationale.json"
    assert main(["--in", str(tmp_path / "train.json"), "--out", str(out), "--seed", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    train = json.loads((tmp_path / "train.json").read_text())
    finetune = load_records(out)
    assert finetune == rationale_train_records(train, seed=1)
    rewritten = [r for r in finetune if parse_rationale(r["conversations"][1]["value"])]
    assert rewritten and all(r["answer_type"] == "CLOSED" for r in rewritten)
    answers = [parse_rationale(r["conversations"][1]["value"])["answer"] for r in rewritten]
    assert 0 < answers.count("yes") < len(answers)
    with pytest.raises(SystemExit):
        main(["--in", str(tmp_path / "train.json"), "--out", str(out), "--open-fraction", "2"])
