"""Record validation: good records load; each malformed record names file, record and field."""

from __future__ import annotations

import json

import pytest

from exgra_med.data.records import RecordError, load_records, validate_record

GOOD = {
    "id": "r1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "What is it?\n<image>"},
        {"from": "gpt", "value": "A lung."},
    ],
    "conversations_long": [
        {"from": "human", "value": "What is it?\n<image>"},
        {"from": "gpt", "value": "A chest CT of the left lung."},
    ],
}


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_loads_good_records_and_renames_misspelled_keys(tmp_path):
    misspelled = {
        "id": 7,
        "conversatons": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    records = load_records(_write(tmp_path, [GOOD, misspelled]))
    assert records[0] == GOOD
    assert records[1] == {"id": 7, "conversations": misspelled["conversatons"]}


def test_loads_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "r2"}) + "\n")
    assert [r["id"] for r in load_records(path, require_long=True)] == ["r1", "r2"]


def _bad(**changes):
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return record


@pytest.mark.parametrize(
    "record, require_long, message",
    [
        (_bad(conversations=None), False, "record 'r1': missing field 'conversations'"),
        (_bad(conversations=[]), False, "record 'r1': field 'conversations' must be a non-empty list"),
        (
            _bad(conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image>"}]),
            False,
            "record 'r1': conversations[0].from is 'gpt', expected 'human'",
        ),
        (
            _bad(conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": 3}]),
            False,
            "record 'r1': conversations[1].value must be a string, got int",
        ),
        (_bad(conversations=[{"from": "human", "value": "<image>"}]), False, "must end with a gpt turn"),
        (_bad(image=5), False, "record 'r1': field 'image' must be a non-empty string"),
        (
            _bad(conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image>"}]),
            False,
            "the first human turn must hold exactly one <image>",
        ),
        (_bad(image=None), False, "holds <image> but the record has no 'image'"),
        (_bad(conversations_long=None), True, "record 'r1': missing field 'conversations_long'"),
        (
            _bad(conversations_long=GOOD["conversations"] * 2),
            False,
            "field 'conversations_long' has 4 turns, 'conversations' has 2",
        ),
        (
            _bad(conversations_long=[{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]),
            False,
            "conversations_long[1].from is 'human', expected 'gpt'",
        ),
    ],
)
def test_malformed_records_name_file_record_and_field(tmp_path, record, require_long, message):
    path = _write(tmp_path, [GOOD, record])
    with pytest.raises(RecordError) as info:
        load_records(path, require_long=require_long)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_record_without_id_is_named_by_index():
    with pytest.raises(RecordError, match=r"src: record #3: missing field 'conversations'"):
        validate_record({"image": "x.png"}, 3, "src")


def test_not_a_list_is_rejected(tmp_path):
    with pytest.raises(RecordError, match="expected a JSON list"):
        load_records(_write(tmp_path, {"id": 1}))
