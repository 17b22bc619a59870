"""Counterfactual controls: the truth read off easy-VQA questions, the edited images (recoloured: only the shape's
pixels change; swapped: same colour, about the same area and position), and the scoring of answers against them."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from exgra_med.eval.counterfactual import (
    PALETTE,
    Probe,
    counterfactual_questions,
    counterfactual_rows,
    known_truth,
    pair_rows,
    palette_colour,
    probe,
    recolour,
    reshape,
    shape_weights,
    wilson,
)
from exgra_med.eval.metrics import reference_answer


@pytest.fixture(scope="module")
def questions(easy_vqa_dir) -> list[dict]:
    return json.loads((easy_vqa_dir / "test.json").read_text())


@pytest.fixture(scope="module")
def truth(questions, easy_vqa_dir) -> dict[str, dict[str, str]]:
    found, unknown = known_truth(questions, easy_vqa_dir / "images")
    assert unknown is None
    return found


def _record(question: str, answer: str, answer_type: str = "CLOSED") -> dict:
    return {"id": "q", "image": "a.png", "answer_type": answer_type,
            "conversations": [{"from": "human", "value": f"{question}\n<image>"}, {"from": "gpt", "value": answer}]}


def test_probe_reads_what_a_question_asks_and_answers_it_for_any_truth():
    negated = probe(_record('Is there not a red shape? (Answer with either "Yes" or "No").', "no"))
    assert negated == Probe("colour", True, "red", True)  # the suffix's "No" is no negation, the question's "not" is
    assert negated.answer({"colour": "red", "shape": "circle"}) == "no"
    assert negated.answer({"colour": "blue", "shape": "circle"}) == "yes"
    asked = probe(_record('Does the image contain a triangle? (Answer with either "Yes" or "No").', "yes"))
    assert asked == Probe("shape", True, "triangle", False)
    assert asked.answer({"colour": "red", "shape": "circle"}) == "no"
    assert probe(_record("What is the red shape?", "circle", "OPEN")) == Probe("shape", False)
    assert probe(_record("What is seen?", "pneumonia", "OPEN")) is None


def test_truth_is_known_for_easy_vqa_only(easy_vqa_dir, questions, truth):
    assert set(truth) == {r["image"] for r in questions}
    for record in questions:
        ask = probe(record)
        if not ask.yes_no:
            assert truth[record["image"]][ask.attribute] == reference_answer(record).strip().lower()
    # where the questions do not give an image's colour, its pixels do: they agree wherever both are known
    for image, facts in truth.items():
        assert palette_colour(Image.open(easy_vqa_dir / "images" / image)) == facts["colour"], image
    one_each = {}
    for record in questions:
        one_each.setdefault(record["image"], record)
    few, _ = known_truth(list(one_each.values()), easy_vqa_dir / "images")
    assert {image: facts["colour"] for image, facts in few.items()} == {
        image: facts["colour"] for image, facts in truth.items()}
    other = [*questions[:3], {**_record("What is seen?", "pneumonia", "OPEN"), "id": "x-1"}]
    found, why = known_truth(other, easy_vqa_dir / "images")
    assert found == {} and "'x-1'" in why


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def _mode(pixels: np.ndarray) -> tuple[int, ...]:
    return Counter(map(tuple, pixels.reshape(-1, 3))).most_common(1)[0][0]


def test_recolouring_changes_only_the_shape_pixels_to_the_new_colour(easy_vqa_dir, truth):
    for image, facts in list(truth.items())[:12]:
        original = Image.open(easy_vqa_dir / "images" / image)
        new = next(c for c in PALETTE if c != facts["colour"])
        before, after = _pixels(original), _pixels(recolour(original, facts["colour"], new))
        background = np.all(before == _mode(before), axis=-1)  # (H, W) the background's colour
        shape = np.all(before == PALETTE[facts["colour"]], axis=-1)  # the shape's pure pixels
        assert background.sum() > 2000 and shape.sum() >= 10, image
        assert np.array_equal(after[background], before[background])
        assert np.all(after[shape] == PALETTE[new])
        changed = np.any(after != before, axis=-1)
        assert changed.sum() >= shape.sum()
        assert not np.any(changed & background)


def _mask_stats(image: Image.Image, colour: str) -> tuple[float, float, float, float]:
    """(area, centroid x, centroid y, share of the bounding box the shape fills) of the shape of `colour`."""
    weights = shape_weights(_pixels(image).astype(np.float64), PALETTE[colour])
    mask = weights >= 0.5
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return float(mask.sum()), float(xs.mean()), float(ys.mean()), float(mask.sum() / box)


FILL = {"rectangle": (0.85, 1.0), "circle": (0.68, 0.88), "triangle": (0.4, 0.65)}  # a shape's share of its box


def test_swapping_the_shape_keeps_its_colour_area_and_position(easy_vqa_dir, truth):
    checked = 0
    for image, facts in list(truth.items())[:12]:
        original = Image.open(easy_vqa_dir / "images" / image)
        area, x, y, _ = _mask_stats(original, facts["colour"])
        for shape in FILL:
            if shape == facts["shape"]:
                continue
            swapped = reshape(original, facts["colour"], shape)
            pixels = _pixels(swapped)
            assert _mode(pixels) == _mode(_pixels(original))  # the same background
            assert np.any(np.all(pixels == PALETTE[facts["colour"]], axis=-1)), image  # the same colour
            new_area, new_x, new_y, fill = _mask_stats(swapped, facts["colour"])
            assert abs(new_area - area) <= 0.2 * area + 4, (image, shape, area, new_area)
            # at the old centroid, or moved just far enough to lie inside the image (then it touches the border)
            mask = shape_weights(pixels.astype(np.float64), PALETTE[facts["colour"]]) >= 0.5
            at_border = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
            assert (abs(new_x - x) <= 3 and abs(new_y - y) <= 3) or at_border, (image, shape, (x, y), (new_x, new_y))
            assert abs(new_x - x) <= 8 and abs(new_y - y) <= 8, (image, shape, (x, y), (new_x, new_y))
            if area >= 150:  # small shapes are too few pixels for their outline to show
                assert FILL[shape][0] <= fill <= FILL[shape][1], (image, shape, fill)
            checked += 1
    assert checked == 24


def test_every_edited_question_and_every_pair_flips_the_truth(easy_vqa_dir, questions, truth, tmp_path):
    edited, paired = counterfactual_questions(questions[:60], truth, easy_vqa_dir / "images", tmp_path, seed=0)
    by_id = {r["id"]: r for r in questions}
    yes_no = [r for r in questions[:60] if probe(r).yes_no]
    assert len(edited) == 60 and 0 < len(paired) <= len(yes_no)
    # a pair is left out only where the image's value is unknown (a shape no question of the image gives)
    assert len(paired) == sum(probe(r).attribute == "colour" or bool(truth[r["image"]]["shape"]) for r in yes_no)
    for record in edited:
        change = record["counterfactual"]
        assert change["old"] == reference_answer(by_id[record["id"]]).strip().lower() != change["new"]
        assert Image.open(record["image"]).size == (64, 64)
        assert change["edit"] == ("shape recoloured" if change["kind"].startswith("colour") else "shape swapped")
    for record in paired:
        original = by_id[record["pair"]["of"]]
        assert record["pair"]["truth"] != reference_answer(original).strip().lower()
        assert record["image"] == original["image"] and record["conversations"] != original["conversations"]
    (tmp_path / "again").mkdir()
    again, _ = counterfactual_questions(questions[:60], truth, easy_vqa_dir / "images", tmp_path / "again", seed=0)
    assert [r["counterfactual"] for r in again] == [r["counterfactual"] for r in edited]  # seeded


def test_wilson_interval():
    assert wilson(0, 10) == pytest.approx((0.0, 27.753), abs=1e-3)
    assert wilson(5, 10) == pytest.approx((23.659, 76.341), abs=1e-3)
    assert wilson(0, 0) == (0.0, 100.0)


def test_rows_count_answers_that_follow_the_new_truth_stay_with_the_old_or_neither():
    recoloured = {"kind": "colour, open", "edit": "shape recoloured", "old": "red"}
    edited = [
        {"id": "1", "counterfactual": {**recoloured, "new": "blue"}},
        {"id": "2", "counterfactual": {**recoloured, "new": "teal"}},
        {"id": "3", "counterfactual": {**recoloured, "new": "gray"}},
        {"id": "4", "counterfactual": {"kind": "shape, yes/no", "edit": "shape swapped", "old": "yes", "new": "no"}},
    ]
    real = {"1": "Red", "2": "red", "3": "red", "4": "circle circle same present yes"}
    rows = counterfactual_rows(edited, {"1": "Blue.", "2": "red", "3": "green", "4": "triangle circle different "
                                                                                  "present no"}, real)
    colour = rows["colour, open"]
    assert colour["n"] == 3 and [colour[k]["count"] for k in ("new", "old", "neither", "both", "changed")] == [
        1, 1, 1, 1, 2]
    assert colour["new"]["percent"] == pytest.approx(100 / 3)
    assert rows["shape, yes/no"]["both"]["count"] == 1 and set(rows) == {"colour, open", "shape, yes/no"}

    questions = [{**_record("Is there a circle?", "yes"), "id": "4"}]
    paired = [{"id": "4#pair", "pair": {"kind": "shape, yes/no", "of": "4", "truth": "no"}}]
    assert pair_rows(paired, questions, real, {"4#pair": "yes"})["shape, yes/no"]["both right"]["count"] == 0
    pairs = pair_rows(paired, questions, real, {"4#pair": "No"})["shape, yes/no"]
    assert pairs["n"] == 1 and pairs["both right"]["count"] == 1 and pairs["question right"]["count"] == 1


def test_a_model_that_ignores_the_image_does_not_follow_the_new_truth(easy_vqa_dir, questions, truth, tmp_path):
    """The question prior (the most frequent training answer of each question text) is a model that never sees the
    image: it answers the edited image as the original, so an answer "follows" the new truth only where it was wrong
    on the original, and none is right on both images; a model that reads the image is right on both."""
    from exgra_med.eval.baselines import question_prior_predictions

    edited, _ = counterfactual_questions(questions, truth, easy_vqa_dir / "images", tmp_path, seed=0)
    prior = question_prior_predictions(json.loads((easy_vqa_dir / "train.json").read_text()), questions)
    rows = counterfactual_rows(edited, prior, prior)
    wrong = Counter(probe(r).kind for r in questions if prior[str(r["id"])] != reference_answer(r).strip().lower())
    assert sum(row["n"] for row in rows.values()) == len(questions)
    for kind, row in rows.items():
        assert row["both"]["count"] == 0 and row["changed"]["count"] == 0, (kind, row)
        assert row["new"]["count"] <= wrong[kind], (kind, row)
        if kind.endswith("yes/no"):  # a yes/no answer that was wrong on the original is the edited image's truth
            assert row["new"]["count"] == wrong[kind] and row["old"]["count"] == row["n"] - wrong[kind], (kind, row)
    yes_no = rows["colour, yes/no"]
    assert yes_no["n"] > 100 and yes_no["new"]["percent"] < 50 and yes_no["both"]["ci95"][1] < 5

    reader = {r["id"]: r["counterfactual"]["new"] for r in edited}  # answers the edited images right
    truthful = {str(r["id"]): reference_answer(r) for r in questions}
    for row in counterfactual_rows(edited, reader, truthful).values():
        assert row["new"]["percent"] == row["both"]["percent"] == row["changed"]["percent"] == 100.0
