"""`exgra-med prepare easy-vqa`: a small, fully offline demo data set from the `easy-vqa` package.

easy-VQA images show one coloured shape; its questions ("what color is the shape?", "is there not a
circle?") say what the shape and colour are. From them this module writes, under `--out`:

- `images/{split}_{id}.png`
- `alignment.json`  stage 1: a description request + `<image>` -> a caption ("A red circle.")
- `instruct.json`   stage 2: multi-turn question answering on the image, with `conversations_long`
                    whose answers restate everything the questions tell about the image
- `train.json`, `val.json` (seeded split by image of the package's train split), `test.json`,
  `candidate.json`: VQA records (METHOD section 6), CLOSED for yes/no answers, OPEN otherwise.

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

from PIL import Image

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.data.prepare.vqa import is_yes_no, make_vqa_record, split_train_val, write_vqa_outputs
from exgra_med.errors import HelpFormatter
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
            with Image.open(src) as img:
                img.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC).save(
                    tmp, format="PNG"
                )
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    # lazy: the easy-VQA package only for its preparation
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
) -> dict[str, int]:
    """Write the easy-VQA demo data set under `out`; returns the number of records per file."""
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
    logger.info("easy-VQA written to %s: %s", out, counts)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `exgra-med prepare easy-vqa --out DIR [--max-images N] [--seed S] [--image-size PX]`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med prepare easy-vqa", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images per split")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument(
        "--image-size", type=int, default=None, help="resize images to PX x PX (default: keep 64)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of train images moved to val")
    parser.add_argument("--max-turns", type=int, default=4, help="question turns per instruct conversation")
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be positive")
    if args.image_size is not None and args.image_size < 1:
        parser.error("--image-size must be positive")
    if args.max_turns < 1:
        parser.error("--max-turns must be positive")
    counts = prepare(args.out, args.max_images, args.seed, args.image_size, args.val_fraction, args.max_turns)
    width = max(len(n) for n in counts)
    for name, n in counts.items():
        print(f"{name.ljust(width)}  {n:6d}")
    return 0
