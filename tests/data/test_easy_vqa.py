"""easy-VQA demo preparation: deterministic files, counts, valid records, facts read off questions."""

from __future__ import annotations

import json

import easy_vqa
import pytest

from exgra_med.data.prepare import easy_vqa as prep
from exgra_med.data.records import load_records

FILES = ["alignment.json", "instruct.json", "train.json", "val.json", "test.json", "candidate.json"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("easyvqa") / "a"
    assert prep.main(["--out", str(out), "--max-images", "10", "--seed", "3"]) == 0
    return out


def _files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files(prepared, tmp_path):
    again = tmp_path / "b"
    prep.main(["--out", str(again), "--max-images", "10", "--seed", "3"])
    assert _files(prepared) == _files(again)
    other = tmp_path / "c"
    prep.main(["--out", str(other), "--max-images", "10", "--seed", "4"])
    assert _files(other)["train.json"] != _files(prepared)["train.json"]


def test_counts_and_splits(prepared):
    images = sorted(p.name for p in (prepared / "images").iterdir())
    assert len(images) == 20 and sum(n.startswith("test_") for n in images) == 10
    vqa = {s: json.loads((prepared / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    train_images = {r["image"] for r in vqa["train"]}
    val_images = {r["image"] for r in vqa["val"]}
    assert len(train_images) == 9 and len(val_images) == 1 and not train_images & val_images
    # every package question of a selected image is kept
    _, _, test_ids = easy_vqa.get_test_questions()
    selected = {int(n[len("test_") : -4]) for n in images if n.startswith("test_")}
    assert len(vqa["test"]) == sum(i in selected for i in test_ids)
    for r in vqa["train"] + vqa["val"] + vqa["test"]:
        closed = r["conversations"][1]["value"] in ("yes", "no")
        assert r["answer_type"] == ("CLOSED" if closed else "OPEN")
        assert r["conversations"][0]["value"].endswith("\n<image>")
        assert ('(Answer with either "Yes" or "No")' in r["conversations"][0]["value"]) == closed
    candidates = json.loads((prepared / "candidate.json").read_text())["0"]
    assert set(candidates) <= set(easy_vqa.get_answers()) - {"yes", "no"}


def test_pretraining_files_are_valid_records(prepared):
    alignment = load_records(prepared / "alignment.json", require_long=True)
    instruct = load_records(prepared / "instruct.json", require_long=True)
    train_images = {r["image"] for r in load_records(prepared / "train.json")}
    assert len(alignment) == len(instruct) == 9
    assert {r["image"] for r in alignment} == {r["image"] for r in instruct} == train_images
    for r in alignment:
        assert len(r["conversations"]) == 2 and r["conversations"][0]["value"].endswith("\n<image>")
        assert r["conversations"][0]["value"].split("\n")[0] in prep.DESCRIBE_REQUESTS
    for r in instruct:
        assert 2 <= len(r["conversations"]) <= 8
        for short, long in zip(r["conversations"][1::2], r["conversations_long"][1::2]):
            assert long["value"].startswith(short["value"] + " The image shows a single ")


def test_facts_from_questions():
    facts = prep.image_facts([("what is the blue shape?", "rectangle"), ("is there not a circle?", "yes")])
    assert (facts.shape, facts.color, facts.not_shapes) == ("rectangle", "blue", {"circle"})
    assert prep.caption(facts) == "A blue rectangle."
    assert prep.extended_caption(facts) == (
        "The image shows a single blue rectangle on a plain background. The shape is a rectangle. "
        "Its colour is blue."
    )
    # two shapes ruled out leaves the third; unknown colour stays unknown but its negatives are told
    facts = prep.image_facts(
        [("is there a circle?", "no"), ("is no triangle present?", "yes"), ("is there a red shape?", "no")]
    )
    assert (facts.shape, facts.color, facts.not_colors) == ("rectangle", None, {"red"})
    assert prep.caption(facts) == "A rectangle."
    assert prep.extended_caption(facts).endswith("Its colour is not red.")


def test_image_size_option(tmp_path):
    from PIL import Image

    prep.main(["--out", str(tmp_path), "--max-images", "2", "--image-size", "32"])
    sizes = {Image.open(p).size for p in (tmp_path / "images").iterdir()}
    assert sizes == {(32, 32)}


def test_instruct_records_feed_the_dataset_and_collator(prepared, word_tokenizer):
    from transformers import CLIPImageProcessor

    from exgra_med.data.collate import DataCollator
    from exgra_med.data.dataset import SupervisedDataset

    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    ds = SupervisedDataset(
        prepared / "instruct.json",
        prepared / "images",
        word_tokenizer,
        proc,
        num_image_tokens=4,
        mm_use_im_start_end=False,
        alignment=True,
    )
    batch = DataCollator(word_tokenizer)([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert (batch["input_ids"] == word_tokenizer.convert_tokens_to_ids("<im_patch>")).sum(1).tolist() == [
        4,
        4,
    ]
    assert batch["extended_mask"].sum() > batch["response_mask"].sum()


def test_rationale_answer_works_the_comparison_out_in_words():
    facts = prep.image_facts([("what is the blue shape?", "circle")])
    cases = {
        ("is there a blue shape?", "yes"): "blue blue same present yes",
        ("is there a red shape?", "no"): "red blue different present no",
        ("is there not a blue shape?", "no"): "blue blue same absent no",
        ("does the image not contain a triangle?", "yes"): "triangle circle different absent yes",
        ("is there no circle?", "No"): "circle circle same absent no",
    }
    for (question, answer), expected in cases.items():
        assert prep.rationale_answer(question, answer, facts) == expected
    assert prep.rationale_answer("is there a blue circle?", "yes", facts) is None  # names two words
    assert prep.rationale_answer("is there a red shape?", "yes", facts) is None  # contradicts the facts
    assert prep.rationale_answer("is there a circle?", "yes", prep.image_facts([])) is None  # shape unknown
    assert prep.rationale_answer("what color is the shape?", "blue", facts) is None  # not yes/no
    assert prep.rationale_answer("is there a red shape?", "no", facts, "{seen} , {answer}") == "blue , no"
    # the reference's closed rule (substring) scores the final word only: no word before it holds "yes" or "no"
    from exgra_med.eval.metrics import closed_hit

    for word in prep.RATIONALE_WORDS + prep.COLORS + prep.SHAPES:
        assert "yes" not in word and "no" not in word
    assert closed_hit("red blue different absent yes", "no") == 0.0
    assert closed_hit("red blue different absent yes", "yes") == 1.0
    assert prep.parse_rationale("Red blue different absent yes") == {
        "asked": "red", "seen": "blue", "comparison": "different", "mode": "absent", "answer": "yes"}
    assert prep.parse_rationale("red , blue , same , present , no")["comparison"] == "same"  # commas accepted
    assert prep.parse_rationale("blue") is None and prep.parse_rationale("red blue same present no no") is None


def test_rationale_train_records_balance_yes_no_and_keep_a_share_of_open_questions():
    from exgra_med.data.prepare.vqa import make_vqa_record

    records = [make_vqa_record(f"o{i}", "a.png", "What color is the shape?", "blue", "OPEN") for i in range(8)]
    records += [make_vqa_record("s", "a.png", "What shape is it?", "circle", "OPEN")]
    records += [make_vqa_record(f"r{i}", f"{'a' if i < 5 else 'b'}.png", "Is there a red shape?", "no", "CLOSED")
                for i in range(6)]
    records += [make_vqa_record("y", "c.png", "Is there a red shape?", "yes", "CLOSED"),
                make_vqa_record("n", "a.png", "Is there not a circle?", "no", "CLOSED")]  # only "no": dropped
    out = prep.rationale_train_records(records, seed=0, open_fraction=0.5)
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
    assert out == prep.rationale_train_records(records, seed=0, open_fraction=0.5)
    assert records[9]["conversations"][1]["value"] == "no"  # the input is not modified
    with pytest.raises(ValueError, match="open_fraction"):
        prep.rationale_train_records(records, seed=0, open_fraction=1.5)


def test_prepare_writes_the_rationale_fine_tuning_file(tmp_path, capsys):
    assert prep.main(["--out", str(tmp_path), "--max-images", "12", "--rationale"]) == 0
    assert "train_rationale" in capsys.readouterr().out
    train = json.loads((tmp_path / "train.json").read_text())
    finetune = load_records(tmp_path / "train_rationale.json")
    assert finetune == prep.rationale_train_records(train, seed=0)
    rewritten = [r for r in finetune if prep.parse_rationale(r["conversations"][1]["value"])]
    assert rewritten and all(r["answer_type"] == "CLOSED" for r in rewritten)
    answers = [prep.parse_rationale(r["conversations"][1]["value"])["answer"] for r in rewritten]
    assert 0 < answers.count("yes") < len(answers)
