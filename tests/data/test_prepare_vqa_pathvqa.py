"""PathVQA from its pickles and from its parquet copy; OmniMedVQA question files."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from exgra_med.data.prepare import omnimedvqa, pathvqa


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def _load(path: Path):
    return json.loads(path.read_text())


def test_pathvqa_pickles(tmp_path):
    raw, out = tmp_path / "pvqa", tmp_path / "out"
    (raw / "qas").mkdir(parents=True)
    def row(img_id, sent, answer, kind):
        return {"img_id": img_id, "sent": sent, "label": {answer: 1}, "answer_type": kind}
    rows = {
        "train": [row("train_0001", "Is this benign?", "yes", "yes/no"),
                  row("train_0001", "What is shown?", "Necrosis", "other")],
        "val": [row("val_0001", "What stain?", "h&e", "other")],
        "test": [row("test_0001", "Is it malignant?", "no", "yes/no")],
    }
    for split, data in rows.items():
        (raw / "qas" / f"{split}_vqa.pkl").write_bytes(pickle.dumps(data))
        img = raw / "images" / split / f"{data[0]['img_id']}.jpg"
        img.parent.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(img)
    assert pathvqa.main(["--raw", str(raw), "--out", str(out)]) == 0
    train = _load(out / "train.json")
    assert [r["id"] for r in train] == ["train_0001_q0", "train_0001_q1"]
    assert train[0]["answer_type"] == "CLOSED" and train[0]["image"] == "train/train_0001.jpg"
    assert train[0]["conversations"][0]["value"].endswith('"Yes" or "No").\n<image>')
    assert train[1]["answer_type"] == "OPEN" and train[1]["conversations"][1]["value"] == "Necrosis"
    assert [r["id"] for r in _load(out / "val.json")] == ["val_0001_q0"]
    assert _load(out / "candidate.json") == {"0": ["necrosis", "h&e"]}
    assert (out / "images" / "test" / "test_0001.jpg").is_file()
    rows["test"][0]["label"] = {}
    (raw / "qas" / "test_vqa.pkl").write_bytes(pickle.dumps(rows["test"]))
    with pytest.raises(ValueError, match=r"test_vqa.pkl: record 0 \(id 'test_0001'\) field 'label'"):
        pathvqa.main(["--raw", str(raw), "--out", str(out)])


def test_pathvqa_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw, out = tmp_path / "hf" / "data", tmp_path / "out"
    raw.mkdir(parents=True)
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    splits = {
        "train": [(red, "Is this tissue?", "yes"), (red, "What organ?", "liver"),
                  (blue, "What cell?", "neuron")],
        "validation": [(blue, "What stain?", "H&E")],
        "test": [(red, "Is it normal?", "no")],
    }
    for name, rows in splits.items():
        table = pa.table({
            "image": [{"bytes": b, "path": None} for b, _, _ in rows],
            "question": [q for _, q, _ in rows], "answer": [a for _, _, a in rows],
        })
        pq.write_table(table, raw / f"{name}-00000-of-00001.parquet")
    assert pathvqa.main(["--raw", str(tmp_path / "hf"), "--out", str(out)]) == 0
    train = _load(out / "train.json")
    assert [r["id"] for r in train] == ["train_000000", "train_000001", "train_000002"]
    assert [r["answer_type"] for r in train] == ["CLOSED", "OPEN", "OPEN"]
    assert train[0]["image"] == train[1]["image"] != train[2]["image"]  # one file per distinct image
    with Image.open(out / "images" / train[2]["image"]) as im:
        assert im.size == (5, 3) and im.getpixel((0, 0)) == (0, 0, 255)
    assert len(list((out / "images" / "train").iterdir())) == 2
    assert [r["id"] for r in _load(out / "val.json")] == ["val_000000"]
    assert _load(out / "candidate.json") == {"0": ["liver", "neuron", "h&e"]}


def test_omnimedvqa_question_ids(tmp_path):
    raw = tmp_path / "QA_information" / "Open-access"
    raw.mkdir(parents=True)
    rows = [{"question": "Which modality?", "option_A": "CT", "option_B": "MRI", "gt_answer": "MRI",
             "image_path": "Images/a.png", "modality_type": "MR"},
            {"question": "Which organ?", "option_A": "lung", "option_B": "liver", "option_C": "heart",
             "gt_answer": "heart", "image_path": "Images/b.png"}]
    (raw / "Tiny Set.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert omnimedvqa.main(["--raw", str(tmp_path / "QA_information"), "--out", str(out)]) == 0
    got = _load(out / "Open-access" / "Tiny Set.json")
    assert [r["question_id"] for r in got] == ["Tiny Set_00000", "Tiny Set_00001"]
    assert got[0]["modality_type"] == "MR" and got[1]["option_C"] == "heart"
    rows[1]["gt_answer"] = "kidney"
    (raw / "Tiny Set.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="record 1 field 'gt_answer'"):
        omnimedvqa.main(["--raw", str(tmp_path / "QA_information"), "--out", str(out)])
