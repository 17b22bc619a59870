"""`exgra-med prepare easy-vqa`: a small, fully offline demo data set from the `easy-vqa` package.

easy-VQA images show one coloured shape; its questions ("what color is the shape?", "is there not a
circle?") say what the shape and colour are. From them this module writes, under `--out`:

- `images/{split}_{id}.png`
- `alignment.json`  stage 1: a description request + `<image>` -> a caption ("A red circle.")
- `instruct.json`   stage 2: multi-turn question answering on the image, with `conversations_long`
                    whose answers restate everything the questions tell about the image
- `train.json`, `val.json` (seeded split by image of the package's train split), `test.json`,
  `candidate.json`: VQA records (METHOD section 6), CLOSED for yes/no answers, OPEN otherwise.
- with `--rationale`, `train_rationale.json`: the demo's fine-tuning file (`rationale_train_records`): train.json's
  yes/no questions balanced per question text, each answered with the comparison worked out in words
  ("red blue different absent yes"), and a seeded share of its open questions.

Pre-training records use only the `train.json` images, so val/test images stay unseen.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.data.prepare.vqa import (
    CLOSED_YES_NO_SUFFIX,
    is_yes_no,
    make_vqa_record,
    split_train_val,
    write_vqa_outputs,
)
from exgra_med.io import write_json_atomic

logger = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
DESCRIBE_REQUESTS = (
    "Describe the image.",
    "What does this image show?",
    "Give a short description of the picture.",
    "Summarize the visual content of the image.",
    "Write a brief caption for this image.",
    "What can you see in this picture?",
    "Provide a concise description of the image.",
    "Explain what is shown in the image.",
)
NEGATION = re.compile(r"\b(not|no)\b")  # a yes/no question that asks for absence
# A yes/no answer worked out in words (`rationale_answer`). No word before the answer contains "yes" or "no", so the
# reference's closed rule (the reference answer is a substring of the prediction) scores the final word. Words only,
# no separators: the comparison is then predicted at the seen word, right after the asked one (with " , " between
# them, the demo's 2-layer LLM learned it as a slower per-pair lookup; README, demo section).
RATIONALE = "{asked} {seen} {comparison} {mode} {answer}"
RATIONALE_FIELDS = ("asked", "seen", "comparison", "mode", "answer")
RATIONALE_WORDS = ("same", "different", "present", "absent")


@dataclass
class ImageFacts:
    """What an image's questions establish: its shape / colour, and the shapes / colours it is not."""

    shape: str | None = None
    color: str | None = None
    not_shapes: set[str] = field(default_factory=set)
    not_colors: set[str] = field(default_factory=set)


def image_facts(qas: Sequence[tuple[str, str]]) -> ImageFacts:
    """Read shape and colour off an image's (question, answer) pairs; negated yes/no questions only
    rule values out, and a single value left after ruling out the others is taken."""
    facts = ImageFacts()

    def assert_value(word: str) -> None:
        if word in SHAPES:
            facts.shape = word
        else:
            facts.color = word

    for question, answer in qas:
        words = [w for w in re.findall(r"[a-z]+", question.lower()) if w in SHAPES or w in COLORS]
        if is_yes_no(answer):
            present = (answer.strip().lower() == "yes") != bool(NEGATION.search(question.lower()))
            for word in words:
                if present:
                    assert_value(word)
                else:
                    (facts.not_shapes if word in SHAPES else facts.not_colors).add(word)
        else:  # open questions presuppose what they mention ("what color is the circle?")
            for word in words + [answer.strip().lower()]:
                if word in SHAPES or word in COLORS:
                    assert_value(word)
    if facts.shape is None and len(set(SHAPES) - facts.not_shapes) == 1:
        facts.shape = (set(SHAPES) - facts.not_shapes).pop()
    if facts.color is None and len(set(COLORS) - facts.not_colors) == 1:
        facts.color = (set(COLORS) - facts.not_colors).pop()
    return facts


def record_question(record: dict) -> str:
    """An easy-VQA record's question in lower case, without `<image>` and the yes/no suffix (whose "No" is not a
    negation)."""
    try:
        text = str(record["conversations"][0]["value"])
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"record {record.get('id')!r}: needs 'conversations' with a question turn") from None
    return text.replace(DEFAULT_IMAGE_TOKEN, "").replace(CLOSED_YES_NO_SUFFIX.strip(), "").strip().lower()


def rationale_answer(question: str, answer: str, facts: ImageFacts, fmt: str = RATIONALE) -> str | None:
    """A yes/no answer with its reasoning in words: the colour or shape the question names, the image's, whether
    they are the same, whether the question asks for presence or absence, then the answer: "Is there not a red
    shape?" on a blue circle -> "red blue different absent yes". `question` as `record_question` gives it.
    None when the question names no single colour or shape, the image's is unknown, or the facts contradict the
    answer."""
    named = [w for w in re.findall(r"[a-z]+", question.lower()) if w in SHAPES or w in COLORS]
    if len(named) != 1 or not is_yes_no(answer):
        return None
    seen = facts.shape if named[0] in SHAPES else facts.color
    if seen is None:
        return None
    same, absent, yes = named[0] == seen, bool(NEGATION.search(question.lower())), answer.strip().lower() == "yes"
    if yes != (same != absent):
        return None
    same_word, different_word, present_word, absent_word = RATIONALE_WORDS
    return fmt.format(
        asked=named[0], seen=seen, comparison=same_word if same else different_word,
        mode=absent_word if absent else present_word, answer="yes" if yes else "no",
    )


def parse_rationale(text: str) -> dict[str, str] | None:
    """The steps of an answer in `RATIONALE`'s form ({"asked": "red", "seen": "blue", "comparison": "different",
    ...}; commas between the words are accepted), or None when it has not five words."""
    words = text.replace(",", " ").lower().split()
    return dict(zip(RATIONALE_FIELDS, words)) if len(words) == len(RATIONALE_FIELDS) else None


def facts_per_image(records: Sequence[dict]) -> dict[str, ImageFacts]:
    """`image_facts` of each image, from all the (question, answer) pairs of `records` about it."""
    per_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for record in records:
        per_image[record["image"]].append((record_question(record), str(record["conversations"][1]["value"])))
    return {image: image_facts(qas) for image, qas in per_image.items()}


def rationale_train_records(records: Sequence[dict], seed: int, open_fraction: float = 0.25) -> list[dict]:
    """The demo's fine-tuning records from train.json's: its yes/no questions balanced per question text
    (`exgra-med subsample --balance-yes-no`, which takes away the wording's prior: 86% of easy-VQA's yes/no answers
    follow from the question alone), each answered by `rationale_answer` (kept as is where that is None), and a
    seeded `open_fraction` of its open questions, in input order. Each image's facts come from all its `records`.

    Why (README, demo section): the demo's tiny random LLM does not learn to compare a word of the question with the
    image when it must answer yes/no at once; with the steps written out it does, within the demo's budget when four
    in five of its questions are yes/no (not with half of them open)."""
    from exgra_med.data.prepare.subsample import balance_yes_no

    if not 0.0 <= open_fraction <= 1.0:
        raise ValueError(f"open_fraction must be in [0, 1], got {open_fraction}")
    facts = facts_per_image(records)
    balanced = balance_yes_no(records, seed)
    open_ids = [i for i, r in enumerate(balanced) if str(r.get("answer_type", "")).upper() != "CLOSED"]
    drop_open = set(open_ids) - set(
        random.Random(f"{seed}-rationale-open").sample(open_ids, round(open_fraction * len(open_ids)))
    )
    out = []
    for i, record in enumerate(balanced):
        if i in drop_open:
            continue
        if str(record.get("answer_type", "")).upper() == "CLOSED":
            answer = rationale_answer(record_question(record), str(record["conversations"][1]["value"]),
                                      facts[record["image"]])
            if answer is not None:
                record = {**record, "conversations": [dict(t) for t in record["conversations"]]}
                record["conversations"][1]["value"] = answer
        out.append(record)
    return out


def caption(facts: ImageFacts) -> str:
    """Short caption: "A red circle.", or "A red shape." / "A circle." when a fact is unknown."""
    what = " ".join(w for w in (facts.color, facts.shape or "shape") if w)
    return f"A {what}."


def extended_caption(facts: ImageFacts) -> str:
    """A longer description restating every fact known about the image, negative ones included."""
    what = " ".join(w for w in (facts.color, facts.shape or "shape") if w)
    parts = [f"The image shows a single {what} on a plain background."]
    if facts.shape:
        parts.append(f"The shape is a {facts.shape}.")
    elif facts.not_shapes:
        parts.append(f"The shape is not a {' or a '.join(sorted(facts.not_shapes))}.")
    if facts.color:
        parts.append(f"Its colour is {facts.color}.")
    elif facts.not_colors:
        parts.append(f"Its colour is not {' or '.join(sorted(facts.not_colors))}.")
    return " ".join(parts)


def _sentence(answer: str) -> str:
    return f"{answer.strip().capitalize()}."


def question_text(text: str) -> str:
    """An easy-VQA question as the prepared records write it (first letter capitalised)."""
    return text.strip()[:1].upper() + text.strip()[1:]


def _copy_image(src: str, dst: Path, image_size: int | None) -> None:
    """Copy (or resize) one PNG atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        if image_size is None:
            shutil.copyfile(src, tmp)
        else:
            from PIL import Image

            with Image.open(src) as img:
                img.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC).save(
                    tmp, format="PNG"
                )
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    import easy_vqa

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return list(zip(texts, answers, image_ids)), paths


def _select(image_ids: Sequence[int], max_images: int | None, seed: int, split: str) -> list[int]:
    ids = sorted(set(image_ids))
    if max_images is not None and max_images < len(ids):
        ids = sorted(random.Random(f"{seed}-select-{split}").sample(ids, max_images))
    return ids


def prepare(
    out: str | os.PathLike,
    max_images: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    max_turns: int = 4,
    rationale_open_fraction: float | None = None,
) -> dict[str, int]:
    """Write the easy-VQA demo data set under `out`; returns the number of records per file. With
    `rationale_open_fraction`, also `train_rationale.json` (`rationale_train_records` of train.json)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    vqa: dict[str, list[dict]] = {}
    train_qas: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for split in ("train", "test"):
        questions, paths = _load_split(split)
        selected = _select([q[2] for q in questions], max_images, seed, split)
        for image_id in selected:
            _copy_image(paths[image_id], out / "images" / f"{split}_{image_id}.png", image_size)
        keep = set(selected)
        records = {}
        for index, (text, answer, image_id) in enumerate(questions):
            if image_id in keep:
                answer_type = "CLOSED" if is_yes_no(answer) else "OPEN"
                records.setdefault(image_id, []).append(
                    make_vqa_record(
                        f"easyvqa-{split}-{index}",
                        f"{split}_{image_id}.png",
                        question_text(text),
                        answer,
                        answer_type,
                    )
                )
                if split == "train":
                    train_qas[image_id].append((text, answer))
        if split == "train":
            train_ids, val_ids = split_train_val(selected, val_fraction, seed)
            vqa["train"] = [r for i in train_ids for r in records[i]]
            vqa["val"] = [r for i in val_ids for r in records[i]]
        else:
            vqa["test"] = [r for i in selected for r in records[i]]

    alignment, instruct = [], []
    rng = random.Random(f"{seed}-conversations")
    for image_id in sorted({int(r["image"][len("train_") : -len(".png")]) for r in vqa["train"]}):
        facts, image = image_facts(train_qas[image_id]), f"train_{image_id}.png"
        request = f"{rng.choice(DESCRIBE_REQUESTS)}\n{DEFAULT_IMAGE_TOKEN}"
        alignment.append(
            {
                "id": f"easyvqa-caption-{image_id}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": request},
                    {"from": "gpt", "value": caption(facts)},
                ],
                "conversations_long": [
                    {"from": "human", "value": request},
                    {"from": "gpt", "value": extended_caption(facts)},
                ],
            }
        )
        qas = rng.sample(train_qas[image_id], min(max_turns, len(train_qas[image_id])))
        short, long = [], []
        for turn, (question, answer) in enumerate(qas):
            human = question_text(question) + (f"\n{DEFAULT_IMAGE_TOKEN}" if turn == 0 else "")
            short += [{"from": "human", "value": human}, {"from": "gpt", "value": _sentence(answer)}]
            long += [
                {"from": "human", "value": human},
                {"from": "gpt", "value": f"{_sentence(answer)} {extended_caption(facts)}"},
            ]
        instruct.append(
            {
                "id": f"easyvqa-instruct-{image_id}",
                "image": image,
                "conversations": short,
                "conversations_long": long,
            }
        )

    write_json_atomic(out / "alignment.json", alignment)
    write_json_atomic(out / "instruct.json", instruct)
    counts = {"alignment": len(alignment), "instruct": len(instruct), **write_vqa_outputs(out, vqa)}
    if rationale_open_fraction is not None:
        finetune = rationale_train_records(vqa["train"], seed, rationale_open_fraction)
        write_json_atomic(out / "train_rationale.json", finetune)
        counts["train_rationale"] = len(finetune)
    logger.info("easy-VQA written to %s: %s", out, counts)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `exgra-med prepare easy-vqa --out DIR [--max-images N] [--seed S] [--image-size PX]`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med prepare easy-vqa", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images per split")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument(
        "--image-size", type=int, default=None, help="resize images to PX x PX (default: keep 64)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of train images moved to val")
    parser.add_argument("--max-turns", type=int, default=4, help="question turns per instruct conversation")
    parser.add_argument(
        "--rationale", action="store_true",
        help="also write train_rationale.json: yes/no balanced, answered with the comparison in words (the demo's "
        "fine-tuning file)",
    )
    parser.add_argument(
        "--rationale-open-fraction", type=float, default=0.25, help="share of the open questions train_rationale keeps"
    )
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be positive")
    if args.image_size is not None and args.image_size < 1:
        parser.error("--image-size must be positive")
    if args.max_turns < 1:
        parser.error("--max-turns must be positive")
    if not 0.0 <= args.rationale_open_fraction <= 1.0:
        parser.error("--rationale-open-fraction must be in [0, 1]")
    counts = prepare(
        args.out, args.max_images, args.seed, args.image_size, args.val_fraction, args.max_turns,
        args.rationale_open_fraction if args.rationale else None,
    )
    width = max(len(n) for n in counts)
    for name, n in counts.items():
        print(f"{name.ljust(width)}  {n:6d}")
    return 0
