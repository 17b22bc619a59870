"""VQA record format, shared helpers, and the VQA-RAD / SLAKE converters on tiny raw fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from exgra_med.data.prepare import slake, vqa_rad
from exgra_med.data.prepare.vqa import (
    CLOSED_YES_NO_SUFFIX,
    candidate_file,
    make_vqa_record,
    split_train_val,
)


def _image(path: Path, color=(255, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def _load(path: Path):
    return json.loads(path.read_text())


def test_make_vqa_record_suffixes():
    yes_no = make_vqa_record(3, "a.jpg", "Is there a mass?", "Yes", "closed")
    assert yes_no["answer_type"] == "CLOSED"
    assert yes_no["conversations"][0]["value"] == (
        'Is there a mass? (Answer with either "Yes" or "No").\n<image>')
    assert CLOSED_YES_NO_SUFFIX.endswith(").")
    other = make_vqa_record(4, "a.jpg", "Left or right?", "Left", "CLOSED")
    assert other["conversations"][0]["value"] == "Left or right?\n<image>"  # no options known: no suffix
    given = make_vqa_record(4, "a.jpg", "Left or right?", "Left", "CLOSED", options=["left", "right"])
    assert given["conversations"][0]["value"] == (
        'Left or right? (Answer with either "left" or "right").\n<image>')
    opened = make_vqa_record(5, "a.jpg", "What organ?", 2, "OPEN")
    assert opened["conversations"][1] == {"from": "gpt", "value": "2"}
    with pytest.raises(ValueError, match="record 6: answer_type"):
        make_vqa_record(6, "a.jpg", "q", "a", "MAYBE")


def test_candidate_file_open_answers_first_seen_lowercase():
    recs = [make_vqa_record(i, "x", "q", a, t) for i, (a, t) in enumerate(
        [("Lung", "OPEN"), ("yes", "CLOSED"), ("Liver", "OPEN"), ("lung", "OPEN"), ("Left", "CLOSED")])]
    assert candidate_file(recs) == {"0": ["lung", "liver"]}


def test_split_train_val_seeded_and_sized():
    recs = [{"id": i} for i in range(20)]
    a, b = split_train_val(recs, 0.25, seed=3), split_train_val(recs, 0.25, seed=3)
    assert a == b and len(a[1]) == 5 and len(a[0]) == 15
    assert split_train_val(recs, 0.25, seed=4)[1] != a[1]
    assert sorted(r["id"] for r in a[0] + a[1]) == list(range(20))
    assert [r["id"] for r in a[0]] == sorted(r["id"] for r in a[0])  # input order kept
    assert len(split_train_val(recs, 0.0, seed=0, val_size=7)[1]) == 7


def _rad(qid, image, question, answer, kind, **extra) -> dict:
    return {"qid": qid, "image_name": image, "question": question, "answer": answer,
            "answer_type": kind, **extra}


def _vqa_rad_raw(root: Path) -> None:
    train = [
        _rad(1, "s1.jpg", "Is there a mass?", "yes", "CLOSED"),
        _rad(2, "s1.jpg", "Which side?", "Left", "CLOSED"),
        _rad(3, "s2.jpg", "How many?", 2, "OPEN"),
        _rad(4, "s2.jpg", "What organ?", "Liver", "OPEN"),
    ]
    test = [_rad("10", "s2.jpg", "Is it normal? ", "No", "CLOSED")]
    root.mkdir(parents=True)
    (root / "trainset.json").write_text(json.dumps(train))
    (root / "testset.json").write_text(json.dumps(test))
    _image(root / "images" / "s1.jpg")
    _image(root / "images" / "s2.jpg", (0, 255, 0))


def test_vqa_rad_end_to_end(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _vqa_rad_raw(raw)
    opts = tmp_path / "opts.json"
    opts.write_text(json.dumps({"2": ["left", "right"]}))
    assert vqa_rad.main(["--raw", str(raw), "--out", str(out), "--val-size", "1", "--seed", "1",
                         "--closed-options", str(opts)]) == 0
    train, val, test = _load(out / "train.json"), _load(out / "val.json"), _load(out / "test.json")
    assert len(train) == 3 and len(val) == 1 and [r["id"] for r in test] == [10]
    by_id = {r["id"]: r for r in train + val}
    assert by_id[2]["conversations"][0]["value"] == (
        'Which side? (Answer with either "left" or "right").\n<image>')
    assert by_id[3]["conversations"][1]["value"] == "2"
    assert test[0]["conversations"][0]["value"] == (
        'Is it normal? (Answer with either "Yes" or "No").\n<image>')
    assert _load(out / "candidate.json") == {"0": ["2", "liver"]}
    assert (out / "images").is_symlink() and (out / "images" / "s1.jpg").is_file()
    # same seed -> same split; copy mode makes a real folder
    out2 = tmp_path / "out2"
    vqa_rad.main(["--raw", str(raw), "--out", str(out2), "--val-size", "1", "--seed", "1",
                  "--copy-images"])
    assert _load(out2 / "val.json")[0]["id"] == val[0]["id"]
    assert not (out2 / "images").is_symlink() and (out2 / "images" / "s2.jpg").is_file()


def test_vqa_rad_public_json_layout_and_errors(tmp_path):
    raw = tmp_path / "raw"
    rows = [
        _rad(1, "s1.jpg", "q1", "yes", "CLOSED", phrase_type="freeform"),
        _rad(2, "s1.jpg", "q2", "lung", "OPEN", phrase_type="test_para"),
    ]
    raw.mkdir()
    (raw / vqa_rad.PUBLIC_JSON).write_text(json.dumps(rows))
    _image(raw / "VQA_RAD Image Folder" / "s1.jpg")
    vqa_rad.main(["--raw", str(raw), "--out", str(tmp_path / "o"), "--val-fraction", "0"])
    assert [r["id"] for r in _load(tmp_path / "o" / "test.json")] == [2]
    assert [r["id"] for r in _load(tmp_path / "o" / "train.json")] == [1]
    del rows[0]["answer"]
    (raw / vqa_rad.PUBLIC_JSON).write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"Public.json: record 0 \(id 1\) lacks field 'answer'"):
        vqa_rad.main(["--raw", str(raw), "--out", str(tmp_path / "o")])
    rows[0]["answer"], rows[0]["image_name"] = "yes", "missing.jpg"
    (raw / vqa_rad.PUBLIC_JSON).write_text(json.dumps(rows))
    with pytest.raises(FileNotFoundError, match="record 1: image"):
        vqa_rad.main(["--raw", str(raw), "--out", str(tmp_path / "o")])


def test_slake_english_only_with_own_val(tmp_path):
    raw, out = tmp_path / "Slake1.0", tmp_path / "out"
    def row(qid, lang, ans, kind):
        return {"qid": qid, "img_name": "xmlab0/source.jpg", "question": f"q{qid}", "answer": ans,
                "answer_type": kind, "q_lang": lang}
    raw.mkdir()
    (raw / "train.json").write_text(json.dumps([row(1, "en", "Lung", "OPEN"), row(2, "zh", "肺", "OPEN"),
                                                row(3, "en", "T2", "CLOSED")]))
    (raw / "validate.json").write_text(json.dumps([row(4, "en", "Heart", "OPEN")]))
    (raw / "test.json").write_text(json.dumps([row(5, "en", "No", "CLOSED")]))
    _image(raw / "imgs" / "xmlab0" / "source.jpg")
    assert slake.main(["--raw", str(raw), "--out", str(out)]) == 0
    assert [r["id"] for r in _load(out / "train.json")] == [1, 3]
    assert [r["id"] for r in _load(out / "val.json")] == [4]
    t3 = _load(out / "train.json")[1]
    assert t3["answer_type"] == "CLOSED" and t3["conversations"][0]["value"] == "q3\n<image>"
    assert _load(out / "candidate.json") == {"0": ["lung", "heart"]}
    assert (out / "images" / "xmlab0" / "source.jpg").is_file()
    (raw / "test.json").write_text(json.dumps([{**row(5, "en", "No", "CLOSED"), "answer_type": "SOMETIMES"}]))
    with pytest.raises(ValueError, match=r"test.json: record 0 field 'answer_type'"):
        slake.main(["--raw", str(raw), "--out", str(out)])
