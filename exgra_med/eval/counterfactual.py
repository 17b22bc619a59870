"""Counterfactual controls of the grounding audit, for data whose truth is known (easy-VQA: one shape of one colour
per image; each question's own answer gives the value it asks about).

Each question is asked again on an edited copy of its image in which the attribute it asks about has changed in a
known way: the shape recoloured (only its pixels change, to another colour of the data set's palette) for colour
questions, the shape swapped for another one of the same colour, area and position for shape questions. An answer
then follows the new truth, stays with the old one, or is neither. Each yes/no question is also paired with the same
question about the other value (the image's true colour or shape and another one), answered on the real image; a
pair counts when both answers are right. Shares come with Wilson 95% intervals.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from exgra_med.data.images import load_image
from exgra_med.data.prepare.easy_vqa import COLORS, NEGATION, SHAPES, image_facts
from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX
from exgra_med.data.records import question_text
from exgra_med.eval.metrics import reference_answer

# The easy-VQA generator's colours (every shape pixel that is not an anti-aliased edge has exactly one of them).
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
    "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0),
}
KINDS = ("colour, open", "colour, yes/no", "shape, open", "shape, yes/no")
EDITS = {"colour": "shape recoloured", "shape": "shape swapped"}
OUTCOMES = ("new", "old", "neither")
SUPERSAMPLE = 4  # shapes are drawn this much larger, then averaged down: edges anti-aliased like the originals
MIN_WEIGHT = 0.1  # below this share of the shape's colour a pixel counts as background and is never changed


@dataclass(frozen=True)
class Probe:
    """What an easy-VQA question asks: the attribute (colour / shape), whether it is yes/no, the value a yes/no
    question names and whether it asks for absence."""

    attribute: str
    yes_no: bool
    named: str | None = None
    negated: bool = False

    @property
    def kind(self) -> str:
        return f"{self.attribute}, {'yes/no' if self.yes_no else 'open'}"

    def answer(self, truth: Mapping[str, str]) -> str:
        """The true answer for an image whose colour and shape are `truth` (`{"colour": .., "shape": ..}`)."""
        if not self.yes_no:
            return truth[self.attribute]
        return "yes" if (self.named == truth[self.attribute]) != self.negated else "no"


def _values(attribute: str) -> tuple[str, ...]:
    return COLORS if attribute == "colour" else SHAPES


def _plain_question(record: Mapping[str, Any]) -> str:
    return question_text(dict(record)).replace(CLOSED_YES_NO_SUFFIX.strip(), "").strip().lower()


def probe(record: Mapping[str, Any]) -> Probe | None:
    """The easy-VQA probe a VQA record is, or None when it is none (an open answer that is no colour or shape, a
    yes/no question that names no single colour or shape)."""
    answer = reference_answer(record).strip().lower()
    if answer not in ("yes", "no"):
        if answer in COLORS or answer in SHAPES:
            return Probe("colour" if answer in COLORS else "shape", yes_no=False)
        return None
    question = _plain_question(record)
    named = [w for w in re.findall(r"[a-z]+", question) if w in COLORS or w in SHAPES]
    if len(named) != 1:
        return None
    return Probe("colour" if named[0] in COLORS else "shape", True, named[0], bool(NEGATION.search(question)))


def palette_colour(image: Image.Image) -> str | None:
    """The palette colour with the most pixels exactly of it in `image`, or None when no pixel is one."""
    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    counts = {name: int(np.all(pixels == rgb, axis=-1).sum()) for name, rgb in PALETTE.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def known_truth(
    questions: Sequence[Mapping[str, Any]], image_folder: str | Path | None,
) -> tuple[dict[str, dict[str, str | None]], str | None]:
    """`({image: {"colour": .., "shape": .. or None}}, None)` when the truth is known: every question is an easy-VQA
    probe (whose own answer gives the value it asks about), and an image's colour is read off its questions or,
    where they do not give it, off its pixels (the palette colour it is drawn in); its shape where its questions give
    it. The images whose colour is found neither way are left out. Otherwise `({}, why not)`."""
    if not questions:
        return {}, "no questions"
    per_image: dict[str, list[tuple[str, str]]] = {}
    for record in questions:
        if probe(record) is None:
            return {}, (f"question {record.get('id')!r} asks about no known colour or shape, so the truth of its image "
                        "is unknown")
        per_image.setdefault(record.get("image") or "", []).append((_plain_question(record), reference_answer(record)))
    truth = {}
    for image, qas in per_image.items():
        if not image:
            continue
        facts = image_facts(qas)
        colour = facts.color or palette_colour(load_image(Path(image_folder or ".") / image))
        if colour:
            truth[image] = {"colour": colour, "shape": facts.shape}
    return (truth, None) if truth else ({}, "no image's colour follows from its questions or its pixels")


def background(pixels: np.ndarray) -> np.ndarray:
    """The background colour of an easy-VQA image (H, W, 3): the median of its border pixels."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2H + 2W, 3)
    return np.median(border, axis=0)


def shape_weights(pixels: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    """(H, W) share of `colour` in each pixel, as a mix of it and the background (0 on the background, 1 inside the
    shape, between on anti-aliased edges); shares under `MIN_WEIGHT` are 0."""
    bg = background(pixels)
    direction = np.asarray(colour, dtype=np.float64) - bg  # (3,)
    weights = np.clip((pixels - bg) @ direction / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.where(weights < MIN_WEIGHT, 0.0, weights)


def recolour(image: Image.Image, old: str, new: str) -> Image.Image:
    """`image` with its `old`-coloured shape in `new`: each pixel moves by its share of the shape's colour, so the
    background stays as it was and the edges stay anti-aliased."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    weights = shape_weights(pixels, PALETTE[old])[..., None]  # (H, W, 1)
    shift = np.asarray(PALETTE[new], dtype=np.float64) - np.asarray(PALETTE[old], dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels + weights * shift), 0, 255).astype(np.uint8))


def _outline(shape: str, cx: float, cy: float, area: float) -> tuple[str, list[tuple[float, float]]]:
    """The drawing of `shape` of `area` around (cx, cy): ("ellipse" | "polygon", points)."""
    if shape == "circle":
        r = math.sqrt(area / math.pi)
        return "ellipse", [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "rectangle":  # a square: easy-VQA's rectangles have independent sides, so squares are among them
        h = math.sqrt(area) / 2
        return "polygon", [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    side = math.sqrt(4 * area / math.sqrt(3))  # equilateral, pointing up, centroid at (cx, cy)
    height = side * math.sqrt(3) / 2
    return "polygon", [(cx, cy - 2 * height / 3), (cx + side / 2, cy + height / 3), (cx - side / 2, cy + height / 3)]


def reshape(image: Image.Image, colour: str, shape: str) -> Image.Image:
    """`image` with its `colour`ed shape replaced by a `shape` of the same colour, area and centroid (moved inside
    the image where it would cross the border), drawn on the image's background."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    weights = shape_weights(pixels, PALETTE[colour])
    area = float(weights.sum())
    if area < 1.0:
        raise ValueError(f"no {colour} shape found in the image")
    ys, xs = np.indices(weights.shape)
    cx, cy = float((xs * weights).sum() / area) + 0.5, float((ys * weights).sum() / area) + 0.5  # pixel centres
    width, height = image.size
    kind, points = _outline(shape, cx, cy, area)
    xs_, ys_ = [p[0] for p in points], [p[1] for p in points]
    dx = max(0.0, -min(xs_)) - max(0.0, max(xs_) - width)
    dy = max(0.0, -min(ys_)) - max(0.0, max(ys_) - height)
    scaled = [((x + dx) * SUPERSAMPLE, (y + dy) * SUPERSAMPLE) for x, y in points]
    fill = tuple(int(v) for v in np.rint(background(pixels)))
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), fill)
    draw = ImageDraw.Draw(canvas)
    if kind == "ellipse":
        draw.ellipse(scaled, fill=PALETTE[colour])
    else:
        draw.polygon(scaled, fill=PALETTE[colour])
    return canvas.resize((width, height), Image.Resampling.BOX)


def _other(values: Sequence[str], not_this: str, rng: random.Random) -> str:
    return rng.choice([v for v in values if v != not_this])


def _with_named(record: Mapping[str, Any], old: str, new: str) -> dict:
    """A copy of `record` whose question names `new` where it named `old`."""
    turns = [dict(t) for t in record["conversations"]]
    turns[0]["value"] = re.sub(rf"\b{old}\b", new, turns[0]["value"], flags=re.IGNORECASE)
    return {**record, "conversations": turns}


def counterfactual_questions(
    questions: Sequence[Mapping[str, Any]], truth: Mapping[str, Mapping[str, str | None]],
    image_folder: str | Path | None, out_dir: Path, seed: int,
) -> tuple[list[dict], list[dict]]:
    """(edited, paired): every question of an image with known truth asked on its edited image (written to
    `out_dir`, absolute paths), and every yes/no one asked about the other value on its real image (where that value
    is known). Each record carries `counterfactual` = {kind, edit, old, new} (the true answers before and after the
    edit) or `pair` = {kind, of (the question's id), truth}. The edit flips every answer: an open question's value
    becomes a seeded other one; a yes/no question that names a value the image does not have gets an image with it,
    one that names the image's value an image with a seeded other one."""
    edited, paired, made = [], [], {}
    for record in questions:
        image, ask = record.get("image"), probe(record)
        if ask is None or image not in truth:
            continue
        facts, answer = truth[image], reference_answer(record).strip().lower()
        values = _values(ask.attribute)
        rng = random.Random(f"{seed}-{record['id']}")
        # the value the image has: an open question's answer, a yes/no question's word when present
        present = ask.yes_no and (answer == "yes") != ask.negated
        value = answer if not ask.yes_no else ask.named if present else facts[ask.attribute]
        if facts[ask.attribute] is not None and value is not None and value != facts[ask.attribute] or (
                ask.yes_no and not present and ask.named == facts[ask.attribute]):
            raise ValueError(f"question {record['id']!r} (image {image}): its answer {answer!r} contradicts the "
                             f"image's {ask.attribute} {facts[ask.attribute]!r}")
        target = ask.named if ask.yes_no and not present else _other(values, value or "", rng)
        key = (image, ask.attribute, target)
        if key not in made:
            original = load_image(Path(image_folder or ".") / image)
            try:
                picture = (recolour(original, facts["colour"], target) if ask.attribute == "colour"
                           else reshape(original, facts["colour"], target))
            except ValueError as e:
                raise ValueError(f"image {image} (question {record['id']!r}): {e}") from e
            path = out_dir / f"{Path(image).stem}_{ask.attribute}_{target}.png"
            picture.save(path)
            made[key] = str(path.resolve())
        edited.append({**record, "image": made[key], "counterfactual": {
            "kind": ask.kind, "edit": EDITS[ask.attribute], "old": answer, "new": ask.answer({ask.attribute: target}),
        }})
        if ask.yes_no and value is not None:
            partner = _other(values, value, rng) if present else value
            paired.append({**_with_named(record, ask.named, partner), "id": f"{record['id']}#pair", "pair": {
                "kind": ask.kind, "of": str(record["id"]), "truth": replace(ask, named=partner).answer(
                    {ask.attribute: value}),
            }})
    return edited, paired


def verdict(answer: str, kind: str) -> str | None:
    """The value an answer gives for a question of `kind`: its last yes/no word for yes/no questions, the one
    colour or shape it names for open ones; None when it gives none (or several)."""
    words = re.findall(r"[a-z]+", answer.lower())
    if kind.endswith("yes/no"):
        said = [w for w in words if w in ("yes", "no")]
        return said[-1] if said else None
    said = {w for w in words if w in _values(kind.split(",")[0])}
    return said.pop() if len(said) == 1 else None


def outcome(answer: str, kind: str, old: str, new: str) -> str:
    """"new" when the answer gives the edited image's truth, "old" when it gives the original's, else "neither"."""
    given = verdict(answer, kind)
    return "new" if given == new else "old" if given == old else "neither"


def wilson(count: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of the share count / n, in percent (95% by default); (0, 100) when n is 0."""
    if n == 0:
        return 0.0, 100.0
    p = count / n
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)
    return 100 * max(0.0, low), 100 * min(1.0, high)  # clipped: rounding must not show -0.0


def share(count: int, n: int) -> dict[str, Any]:
    """{count, n, percent, ci95} of one share."""
    return {"count": count, "n": n, "percent": 100.0 * count / n if n else 0.0, "ci95": list(wilson(count, n))}


def counterfactual_rows(
    edited: Sequence[Mapping[str, Any]], edited_answers: Mapping[str, str], real_answers: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """{kind: {edit, n, new, old, neither, both, changed}}: the shares of the answers on the edited images that
    follow the new truth, stay with the old one or neither; of the questions answered right on the real image and
    with the new truth on the edited one ("both": 0 for any model that ignores the image, whose answer cannot give
    two different truths); and of the answers that differ from the same question's real-image answer."""
    rows = {}
    for kind in KINDS:
        records = [r for r in edited if r["counterfactual"]["kind"] == kind]
        if not records:
            continue
        counts = dict.fromkeys(OUTCOMES, 0)
        both = changed = 0
        for r in records:
            truth, answer, real = r["counterfactual"], edited_answers[str(r["id"])], real_answers[str(r["id"])]
            followed = outcome(answer, kind, truth["old"], truth["new"])
            counts[followed] += 1
            both += followed == "new" and verdict(real, kind) == truth["old"]
            changed += answer.strip().lower() != real.strip().lower()
        n = len(records)
        rows[kind] = {"edit": records[0]["counterfactual"]["edit"], "n": n,
                      **{name: share(counts[name], n) for name in OUTCOMES}, "both": share(both, n),
                      "changed": share(changed, n)}
    return rows


def pair_rows(
    paired: Sequence[Mapping[str, Any]], questions: Sequence[Mapping[str, Any]], real_answers: Mapping[str, str],
    pair_answers: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """{kind: {n, both right, question right}}: each yes/no question and its partner about the other value (same
    image) scored as a pair, beside the share of the original questions answered right."""
    by_id = {str(q["id"]): q for q in questions}
    rows = {}
    for kind in ("colour, yes/no", "shape, yes/no"):
        records = [r for r in paired if r["pair"]["kind"] == kind]
        if not records:
            continue
        single = both = 0
        for r in records:
            original = by_id[r["pair"]["of"]]
            right = verdict(real_answers[r["pair"]["of"]], kind) == reference_answer(original).strip().lower()
            single += right
            both += right and verdict(pair_answers[str(r["id"])], kind) == r["pair"]["truth"]
        rows[kind] = {"n": len(records), "both right": share(both, len(records)),
                      "question right": share(single, len(records))}
    return rows
