"""examples/easy_vqa/rationale_answers.py: the earlier experiment's rationale answers ("red , blue , no")."""

from __future__ import annotations


def test_rationale_answers_name_the_question_word_then_the_image_word():
    from examples.easy_vqa.rationale_answers import rationale_answers
    from exgra_med.data.prepare.vqa import make_vqa_record

    records = [
        make_vqa_record(0, "a.png", "What color is the shape?", "blue", "OPEN"),
        make_vqa_record(1, "a.png", "Is there a red shape?", "no", "CLOSED"),
        make_vqa_record(2, "a.png", "Is there not a blue shape?", "no", "CLOSED"),
        make_vqa_record(3, "a.png", "Is there a circle?", "yes", "CLOSED"),  # tells the shape of a.png
        make_vqa_record(4, "b.png", "Is there not a triangle?", "yes", "CLOSED"),  # b.png: shape unknown
        make_vqa_record(5, "a.png", "Does the image contain a blue circle?", "yes", "CLOSED"),  # names two words
    ]
    out, changed = rationale_answers(records)
    answers = [r["conversations"][1]["value"] for r in out]
    assert answers == ["blue", "red , blue , no", "blue , blue , no", "circle , circle , yes", "yes", "yes"]
    assert changed == 3 and records[1]["conversations"][1]["value"] == "no"  # the input is not modified
    assert all("yes" not in a.rsplit(",", 1)[0] and "no" not in a.rsplit(",", 1)[0] for a in answers[1:4])
