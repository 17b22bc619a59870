"""examples/easy_vqa/breakdown.py: a demo model's easy-VQA scores per question kind and image condition, and the "seen"
word of rationale answers checked against the image's truth."""

from __future__ import annotations

import pytest


def test_breakdown_scores_each_question_kind_per_condition(tmp_path, capsys):
    import json

    from examples.easy_vqa.breakdown import breakdown, comparisons, main, question_kind
    from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX, make_vqa_record

    questions = [
        make_vqa_record(0, "a.png", "What color is the shape?", "blue", "OPEN"),
        make_vqa_record(1, "a.png", "What shape is present?", "circle", "OPEN"),
        make_vqa_record(2, "a.png", "What shape is in the image?", "circle", "OPEN"),
        make_vqa_record(3, "a.png", "Is there a red shape?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
        make_vqa_record(4, "a.png", "Is there not a blue shape?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
        make_vqa_record(5, "a.png", "Does the image contain a circle?" + CLOSED_YES_NO_SUFFIX, "yes", "CLOSED"),
        make_vqa_record(6, "a.png", "Is there no triangle?" + CLOSED_YES_NO_SUFFIX, "yes", "CLOSED"),
    ]
    assert [question_kind(q) for q in questions] == [
        "open: colour", "open: shape", "open: shape", "yes/no: colour, truth no", "yes/no: colour, negated, truth no",
        "yes/no: shape, truth yes", "yes/no: shape, negated, truth yes",
    ]
    real = {"0": "blue", "1": "circle", "2": "triangle", "3": "no", "4": "no", "5": "yes", "6": "no"}
    blank = {"0": "red", "1": "circle", "2": "circle", "3": "yes", "4": "yes", "5": "yes", "6": "yes"}
    table = breakdown(questions, {"real": real, "blank": blank})
    assert table["open: colour"] == {"real": (1, 100.0), "blank": (1, 0.0)}
    assert table["open: shape"] == {"real": (2, 50.0), "blank": (2, 100.0)}
    assert table["yes/no: colour, truth no"]["real"] == (1, 100.0)
    assert table["yes/no: shape, negated, truth yes"] == {"real": (1, 0.0), "blank": (1, 100.0)}

    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "audit.json").write_text(json.dumps({"answers": {"real images": real, "blank images": blank}}))
    assert main(["--questions", str(tmp_path / "q.json"), "--audit", str(tmp_path / "audit.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| question kind | questions | real images | blank images |"
    assert out[3] == "| open: shape | 2 | 50.0 | 100.0 |" and len(out) == 2 + 6
    # rationale answers: the comparison word is checked against the two words before it, per condition
    rationale = dict(real, **{"3": "red blue different present no", "4": "blue blue different absent no",
                              "5": "circle circle same present yes", "6": "triangle circle"})
    assert comparisons(questions, {"real": real, "rationale": rationale}) == {"rationale": (2, 3)}
    (tmp_path / "audit.json").write_text(json.dumps({"answers": {"real images": rationale}}))
    assert main(["--questions", str(tmp_path / "q.json"), "--audit", str(tmp_path / "audit.json")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "real images: the comparison agrees with the asked and seen words in 2 of the 3 yes/no answers written as "
        "a rationale")
    del real["6"]
    with pytest.raises(ValueError, match=r"real: no answer for question\(s\) \['6'\]"):
        breakdown(questions, {"real": real})


def test_the_seen_word_is_checked_against_the_image_not_only_the_comparison(tmp_path, capsys):
    import json

    from examples.easy_vqa.breakdown import comparisons, main, seen_words
    from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX, make_vqa_record

    questions = [  # a.png: a blue circle
        make_vqa_record(0, "a.png", "What color is the shape?", "blue", "OPEN"),
        make_vqa_record(1, "a.png", "What shape is present?", "circle", "OPEN"),
        make_vqa_record(2, "a.png", "Is there a red shape?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
        make_vqa_record(3, "a.png", "Is there not a blue shape?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
        make_vqa_record(4, "a.png", "Is there a triangle?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
        make_vqa_record(5, "a.png", "Is there no circle?" + CLOSED_YES_NO_SUFFIX, "no", "CLOSED"),
    ]
    # 2: read off the image; 3: right; 4: the question's word copied, with a consistent comparison and a wrong
    # answer; 5: another wrong word, not a copy.
    answers = {"0": "blue", "1": "circle", "2": "red blue different present no", "3": "blue blue same absent no",
               "4": "triangle triangle same present yes", "5": "circle rectangle different absent yes"}
    assert comparisons(questions, {"real": answers}) == {"real": (4, 4)}  # every comparison is consistent
    assert seen_words(questions, {"real": answers, "plain": {"2": "no"}}) == {"real": (2, 1, 4)}

    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "audit.json").write_text(json.dumps({"answers": {"real images": answers}}))
    assert main(["--questions", str(tmp_path / "q.json"), "--audit", str(tmp_path / "audit.json")]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "real images: the seen word is the image's own colour or shape in 2 of the 4 yes/no answers written as a "
        "rationale; it copies the question's word instead in 1",
        "real images: the comparison agrees with the asked and seen words in 4 of the 4 yes/no answers written as a "
        "rationale",
    ]
