"""merge-extended: conversations + conversations_long, with id and turn-structure checks."""

from __future__ import annotations

import json

import pytest

from exgra_med.data.prepare.merge_extended import main, merge_extended


def _rec(
    rid: str, answers: list[str], key: str = "conversations", questions: list[str] | None = None
) -> dict:
    questions = questions or [f"q{i} of {rid}" for i in range(len(answers))]
    conv = []
    for q, a in zip(questions, answers):
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": rid, "image": f"{rid}.jpg", key: conv}


def test_merge_keeps_original_and_adds_long() -> None:
    original = [_rec("a", ["short a"]), _rec("b", ["b1", "b2"], key="conversatons")]
    extended = [_rec("b", ["long b1", "long b2"]), _rec("a", ["long a"])]
    merged, missing = merge_extended(original, extended)
    assert missing == []
    assert [r["id"] for r in merged] == ["a", "b"]
    assert [t["value"] for t in merged[1]["conversations"]] == ["q0 of b", "b1", "q1 of b", "b2"]
    assert [t["value"] for t in merged[1]["conversations_long"]] == [
        "q0 of b",
        "long b1",
        "q1 of b",
        "long b2",
    ]
    assert "conversatons" not in merged[1] and merged[0]["image"] == "a.jpg"


@pytest.mark.parametrize(
    ("extended", "match"),
    [
        ([_rec("a", ["x", "y"])], "record a: 4 turns, the original has 2"),
        ([_rec("a", ["x"], questions=["another question"])], "record a: human turn 0 differs"),
        ([_rec("a", [" "])], "record a: gpt turn 1 is empty"),
        ([_rec("a", ["x"]), _rec("zz", ["x"])], "1 ids are not in the original"),
    ],
)
def test_structure_errors_name_the_record(extended: list[dict], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge_extended([_rec("a", ["short"])], extended)


def test_speaker_mismatch() -> None:
    ext = _rec("a", ["x"])
    ext["conversations"][0]["from"] = "gpt"
    with pytest.raises(ValueError, match="turn 0 is from 'gpt'"):
        merge_extended([_rec("a", ["short"])], [ext])


def test_missing_ids_need_allow_missing(tmp_path) -> None:
    original = [_rec("a", ["1"]), _rec("b", ["2"])]
    extended = [_rec("b", ["long 2"])]
    with pytest.raises(ValueError, match=r"1 original ids have no extended version, e.g. \['a'\]"):
        merge_extended(original, extended)
    (tmp_path / "o.json").write_text(json.dumps(original))
    (tmp_path / "e.json").write_text(json.dumps(extended))
    args = [
        "--original",
        str(tmp_path / "o.json"),
        "--extended",
        str(tmp_path / "e.json"),
        "--out",
        str(tmp_path / "m.json"),
    ]
    assert main(args) == 1 and not (tmp_path / "m.json").exists()
    assert main(args + ["--allow-missing"]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [r["id"] for r in merged] == ["b"] and merged[0]["conversations_long"][1]["value"] == "long 2"
