"""examples/easy_vqa/breakdown.py: the "seen" word of rationale answers checked against the image's truth."""

from __future__ import annotations


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
