"""examples/easy_vqa/probe_yes_no.py: the yes/no comparison probe with the image's fact as text."""

from __future__ import annotations

import pytest


def test_yes_no_probe_answers_follow_the_fact_and_the_negation():
    import random

    from examples.easy_vqa.probe_yes_no import closed_questions, sample

    questions = closed_questions()
    assert any(" not " in q for q in questions) and all(q.endswith('"No").') for q in questions)
    rng = random.Random(0)
    samples = [sample(rng, questions) for _ in range(400)]
    for question, fact, yes in samples:
        asked = [w for w in fact.split() if w in question.lower()]
        negated = " not " in question or " no " in question
        assert yes == ((len(asked) == len(fact.split())) != negated), (question, fact, yes)
    assert 0.4 < sum(yes for _, _, yes in samples) / len(samples) < 0.6  # balanced: no answer prior


def test_yes_no_probe_trains_and_reports(capsys):
    from examples.easy_vqa.probe_yes_no import main

    assert main(["--steps", "2", "--every", "1", "--batch", "4", "--image-tokens", "3", "--hidden", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3 image tokens" in lines[0] and len(lines) == 4
    step, stand_ins, loss, accuracy, _ = lines[-1].split()
    assert step == "2" and stand_ins == "3" and 0 < float(loss) < 5 and 0 <= float(accuracy) <= 100


@pytest.mark.slow
def test_yes_no_probe_curriculum_grows_the_image_stand_ins(capsys):
    from examples.easy_vqa.probe_yes_no import main

    args = ["--steps", "5", "--every", "1", "--batch", "2", "--image-tokens", "8", "--hidden", "32",
            "--start-tokens", "0", "--hold", "1", "--ramp", "2"]
    assert main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "0"), ("2", "4"), ("3", "8"), ("4", "8"), ("5", "8")]
    with pytest.raises(SystemExit):
        main(["--image-tokens", "4", "--start-tokens", "5"])
