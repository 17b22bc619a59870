"""easy-VQA preparation: deterministic files, counts, valid records, facts read off questions. (The demo's rationale
answers: tests/examples/easy_vqa/test_rationale.py.)"""

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
