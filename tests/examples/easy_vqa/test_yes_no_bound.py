"""examples/easy_vqa/yes_no_bound.py: expected yes/no accuracy of the question prior plus a comparison."""

from __future__ import annotations

import pytest


def test_yes_no_bound_follows_the_comparison_only_where_it_beats_the_question_prior():
    from examples.easy_vqa.yes_no_bound import expected_closed_accuracies
    from exgra_med.data.prepare.vqa import make_vqa_record

    def records(question: str, answers: list[str], start: int) -> list[dict]:
        return [make_vqa_record(start + i, "x.png", question, a, "CLOSED") for i, a in enumerate(answers)]

    # "red" has a prior share of 7/8 ("no"), "not red" of 3/4 ("yes"); an open record is left out.
    train = records("Is there a red shape?", ["no"] * 7 + ["yes"], 0) + records("Is there not a red shape?",
                                                                              ["yes"] * 3 + ["no"], 10)
    test = (records("Is there a red shape?", ["no", "no"], 20) + records("Is there not a red shape?", ["yes", "no"], 30)
            + [make_vqa_record(40, "x.png", "What color is the shape?", "red", "OPEN")])
    prior, only_not_red, both, perfect = expected_closed_accuracies(train, test, [0.5, 0.8, 0.9, 1.0])
    assert prior == 75.0  # the prior: 3 of 4 right
    assert abs(only_not_red - 90.0) < 1e-9  # (2 + 0.8 + 0.8) / 4: only "not red" follows
    assert abs(both - 90.0) < 1e-9  # both follow the comparison
    assert perfect == 100.0
    with pytest.raises(ValueError, match="reliability"):
        expected_closed_accuracies(train, test, [0.9, 0.4])
    with pytest.raises(ValueError, match="no CLOSED"):
        expected_closed_accuracies(train, test[-1:], [0.9])


def test_yes_no_bound_cli_prints_the_table(tmp_path, capsys):
    import json

    from examples.easy_vqa.yes_no_bound import main
    from exgra_med.data.prepare.vqa import make_vqa_record

    answers = ["no", "no", "yes"]
    train = [make_vqa_record(i, "x.png", "Is there a red shape?", a, "CLOSED") for i, a in enumerate(answers)]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(train[:2]))
    assert main(["--train", str(tmp_path / "train.json"), "--test", str(tmp_path / "test.json"),
                 "--reliability", "0.5", "0.9"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 yes/no test questions") and out[-2:] == ["| 50% | 100.0 |", "| 90% | 90.0 |"]
