"""The training / evaluation record schema and its validation.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...],
"conversations_long"?: [...]}``. `conversations` alternates human/gpt, starting with a human turn and
ending with a gpt turn; when `image` is given, the first human turn holds the single `<image>`
placeholder. `conversations_long` (METHOD section 3) has the same turns with extended gpt answers.
Records for transformers-native VLMs (`multi_image=True`) may list several images (`"image": [path, ...]`, e.g. the
views of one study); their human turns then hold one `<image>` per listed image, in order.
The reference's misspelled keys `conversatons` / `conversatons_long` are accepted and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from exgra_med.constants import DEFAULT_IMAGE_TOKEN, GPT, HUMAN
from exgra_med.errors import UserError
from exgra_med.io import read_json, read_jsonl

_MISSPELLED = {"conversatons": "conversations", "conversatons_long": "conversations_long"}


class RecordError(UserError):
    """A record that breaks the schema; the message names the file, the record and the field."""


def record_label(record: Any, index: int) -> str:
    """How errors name a record: its id when it has one, else its position."""
    if isinstance(record, dict) and record.get("id") is not None:
        return f"record {record['id']!r}"
    return f"record #{index}"


def _check_turns(turns: Any, field: str, where: str) -> None:
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: field {field!r} must be a non-empty list of turns")
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"{where}: {field}[{t}] must be an object with 'from' and 'value'")
        expected = HUMAN if t % 2 == 0 else GPT
        if turn["from"] != expected:
            raise RecordError(
                f"{where}: {field}[{t}].from is {turn['from']!r}, expected {expected!r} "
                "(turns must alternate human/gpt, starting with human)"
            )
        if not isinstance(turn["value"], str):
            raise RecordError(
                f"{where}: {field}[{t}].value must be a string, got {type(turn['value']).__name__}"
            )
    if len(turns) % 2:
        raise RecordError(f"{where}: field {field!r} must end with a gpt turn (it has {len(turns)} turns)")


def record_images(record: dict) -> list[str]:
    """The image paths of a (validated) record: none, its one `image`, or its list of images."""
    image = record.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, list) else [image]


def _check_image_list(record: dict, image_counts: list[int], where: str) -> None:
    images = record["image"]
    if not images or not all(isinstance(i, str) and i for i in images):
        raise RecordError(f"{where}: field 'image' must be a non-empty string or a non-empty list of them, "
                          f"got {images!r}")
    in_answers = sum(image_counts[1::2])
    if in_answers or sum(image_counts) != len(images):
        raise RecordError(
            f"{where}: field 'conversations': the human turns must hold one {DEFAULT_IMAGE_TOKEN} per listed image "
            f"({len(images)}) and gpt turns none (counts per turn: {image_counts})"
        )


def validate_record(
    record: Any, index: int, source: str = "<records>", require_long: bool = False, multi_image: bool = False
) -> dict:
    """Check one record against the schema; returns a shallow copy with misspelled keys renamed.

    `multi_image`: `image` may be a list (transformers-native VLMs). Raises `RecordError` naming `source`, the record
    id (or index) and the offending field.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{source}: record #{index} must be an object, got {type(record).__name__}")
    where = f"{source}: {record_label(record, index)}"
    record = dict(record)
    for wrong, right in _MISSPELLED.items():
        if wrong in record and right not in record:
            record[right] = record.pop(wrong)
    if "conversations" not in record:
        raise RecordError(f"{where}: missing field 'conversations'")
    turns = record["conversations"]
    _check_turns(turns, "conversations", where)

    image_counts = [turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns]
    if isinstance(record.get("image"), list):
        if not multi_image:
            raise RecordError(
                f"{where}: field 'image' lists {len(record['image'])} images; several images per record need a "
                "transformers-native VLM (--model_name_or_path a Qwen2.5-VL / Gemma 3 / LLaVA-OneVision folder)"
            )
        _check_image_list(record, image_counts, where)
    elif "image" in record:
        if not isinstance(record["image"], str) or not record["image"]:
            raise RecordError(f"{where}: field 'image' must be a non-empty string, got {record['image']!r}")
        if image_counts[0] != 1 or sum(image_counts) != 1:
            raise RecordError(
                f"{where}: field 'conversations': the first human turn must hold exactly one "
                f"{DEFAULT_IMAGE_TOKEN} and no other turn may (counts per turn: {image_counts})"
            )
    elif sum(image_counts):
        raise RecordError(
            f"{where}: field 'conversations' holds {DEFAULT_IMAGE_TOKEN} but the record has no 'image'"
        )

    if "conversations_long" in record:
        long_turns = record["conversations_long"]
        _check_turns(long_turns, "conversations_long", where)
        if len(long_turns) != len(turns):
            raise RecordError(
                f"{where}: field 'conversations_long' has {len(long_turns)} turns, "
                f"'conversations' has {len(turns)}"
            )
    elif require_long:
        raise RecordError(f"{where}: missing field 'conversations_long' (needed for the alignment texts)")
    return record


def load_records(path: str | os.PathLike, require_long: bool = False, multi_image: bool = False) -> list[dict]:
    """Read a JSON list (or JSON-lines, `.jsonl`) of records and validate every one of them (`multi_image`: see
    `validate_record`)."""
    path = Path(path)
    data = read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [validate_record(r, i, str(path), require_long, multi_image) for i, r in enumerate(data)]


def question_text(record: dict) -> str:
    """The first human turn of a VQA record without the `<image>` token (`conversatons` accepted)."""
    turns = record.get("conversations", record.get("conversatons"))
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
        raise ValueError(f"record {record.get('id')!r}: needs 'conversations' with a human turn")
    return str(turns[0]["value"]).replace(DEFAULT_IMAGE_TOKEN, "").strip()
