"""Hand-computed values of the VQA metrics, the in-training metric and the `score` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exgra_med.cli import main as cli_main
from exgra_med.eval.glossary import normalize_word
from exgra_med.eval.metrics import (
    exact_match,
    f1_precision_recall,
    format_table,
    main,
    open_hit,
    score_vqa,
    vqa_train_metrics,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vqa_scoring"


def _rec(rid, kind, answer):
    return {"id": rid, "answer_type": kind, "conversations": [
        {"from": "human", "value": "q\n<image>"}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("text, expected", [
    ("The answer is two.", "answer is 2"),
    ("left-sided", "left sided"),          # mark inside a word -> space
    ("x - ray", "x ray"),                  # mark touching a space -> deleted
    ("1,000 cells, mostly", "1000 cells mostly"),  # digit,digit -> every mark deleted
    ("dont know", "don't know"),
    ("3.5 cm.", "3.5 cm"),                 # a period before a digit stays
    ("x." * 40, "x" * 32 + "x." * 8),      # only 32 periods go (the reference's count quirk)
])
def test_normalize_word_hand_values(text, expected):
    assert normalize_word(text) == expected


def test_token_metrics_hand_values():
    assert exact_match("left", "left lung") == 1.0            # 1 shared word / 1 predicted word
    assert exact_match("yes yes", "yes") == 0.5
    f1, p, r = f1_precision_recall("left", "left lung")
    assert (p, r) == (1.0, 0.5) and f1 == pytest.approx(2 / 3)
    assert f1_precision_recall("yes yes", "yes") == (1.0, 1.0, 1.0)  # tp counts prediction repeats
    assert f1_precision_recall("", "yes") == (0.0, 0.0, 0.0)
    cands = ["kidney", "left lung", "lung"]
    assert open_hit("the left lung is clear", "left lung", cands) == 1.0  # 2/2 words, first of the ties
    assert open_hit("lung", "left lung", cands) == 0.0  # "lung" covers 1/1, "left lung" only 1/2


def test_open_hit_ties_go_to_first_candidate():
    # both candidates are fully covered (score 1.0): the first wins, as `list.index(max(...))` does
    assert open_hit("left lung", "lung", ["lung", "left lung"]) == 1.0
    assert open_hit("left lung", "left lung", ["lung", "left lung"]) == 0.0


def test_score_vqa_small_set_by_hand():
    gt = [_rec(1, "OPEN", "left lung"), _rec(2, "OPEN", "two"), _rec(3, "CLOSED", "yes"),
          _rec(4, "CLOSED", "no")]
    pred = {1: "left", 2: "2 lesions", 3: "Yes.", 4: "yes"}
    s = score_vqa(gt, pred, {"0": ["left lung", "2", "left"]})
    assert s["closed_accuracy"] == 50.0
    assert s["exact_match"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert s["recall"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert s["precision"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    # "left" -> candidate "left" (1/1) beats "left lung" (1/2): miss; "2 lesions" -> "2": hit
    assert s["open_accuracy"] == 50.0
    assert s["num_open"] == 2 and s["num_closed"] == 2


def test_vqa_train_metrics_by_hand():
    gt = [_rec("a", "OPEN", "left lung"), _rec("b", "OPEN", "kidney"), _rec("c", "CLOSED", "yes"),
          _rec("d", "CLOSED", "no")]
    pred = {"a": "left ###Human: more", "b": "the kidney", "c": "yes", "d": "yes"}
    m = vqa_train_metrics(gt, pred)
    assert m == {"open_recall": 75.0, "closed_accuracy": 50.0, "average": 62.5}


def test_mismatched_ids_are_named():
    gt = [_rec(1, "OPEN", "a"), _rec(2, "CLOSED", "yes")]
    with pytest.raises(ValueError, match=r"\['2'\].*\['7'\]"):
        score_vqa(gt, {1: "a", 7: "yes"}, ["a"])
    with pytest.raises(ValueError, match="duplicate ids"):
        score_vqa([_rec(1, "OPEN", "a"), _rec(1, "OPEN", "a")], {1: "a"}, ["a"])
    with pytest.raises(ValueError, match="answer_type"):
        score_vqa([_rec(1, "MAYBE", "a")], {1: "a"}, ["a"])


def test_score_command_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "scores.json"
    rc = main(["--gt", str(FIXTURES / "test.json"), "--pred", str(FIXTURES / "answers.jsonl"),
               "--candidate", str(FIXTURES / "candidate.json"), "--json", str(out)])
    assert rc == 0
    scores = json.loads(out.read_text())
    assert scores["closed_accuracy"] == 60.0  # ids 1, 2, 4 hit; 3 ("yes" not in text), 16 (empty) miss
    assert scores["open_accuracy"] == pytest.approx(100 * 10 / 13)
    printed = capsys.readouterr().out
    assert "num_open 13 || num_close 5" in printed and "yes/no accuracy" in printed
    assert format_table(scores).splitlines()[0].split() == ["Metric", "Performance"]


def test_score_command_names_missing_prediction(tmp_path):
    pred = tmp_path / "answers.jsonl"
    pred.write_text(json.dumps({"question_id": 1, "text": "yes"}) + "\n")
    with pytest.raises(ValueError, match="17 ids without a prediction"):
        main(["--gt", str(FIXTURES / "test.json"), "--pred", str(pred),
              "--candidate", str(FIXTURES / "candidate.json")])


@pytest.mark.parametrize("candidates, found", [
    ({"1": ["yes"]}, "an object without key '0'"),  # was a KeyError traceback
    ([{"id": 1}, {"id": 2}], "a list of objects"),  # a records file by mistake: was silently 0
    ([["yes", "no"]], "a list of lists"),
    ({"0": "yes"}, "'0' is a str"),
    ([], "an empty list"),
    ("yes", "a str"),
])
def test_score_refuses_a_candidate_file_of_the_wrong_shape_in_one_line(tmp_path, capsys, candidates, found):
    path = tmp_path / "candidate.json"
    path.write_text(json.dumps(candidates))
    rc = cli_main(["score", "--gt", str(FIXTURES / "test.json"), "--pred", str(FIXTURES / "answers.jsonl"),
                   "--candidate", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"exgra-med score: error: {path}: ") and found in err[0]
    assert 'expected {"0": [answers]} or a list of answers' in err[0]
