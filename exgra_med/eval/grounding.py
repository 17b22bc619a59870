"""Grounding audit: does the model read the image? The same questions answered with the real images, with blank
(white) images of the same size, and with the images shuffled across questions (seeded, no question keeps its own),
each scored with the reference VQA metrics beside the answer-prior baselines.

A model that reads the image scores clearly higher with the real images than with blank or shuffled ones; equal
scores mean its answers come from the question alone, whatever the headline number.

For data whose truth is known (easy-VQA: every question asks about the colour or the shape of the image's one shape)
the audit adds counterfactual controls (`exgra_med.eval.counterfactual`): each question asked again on its image edited
so that its answer changes (the shape recoloured, or swapped for another shape of the same colour, area and position),
the answers counted as following the new truth, staying with the old one or neither, with Wilson 95% intervals, and
each yes/no question paired with the same question about another value, scored as a pair. For other data it keeps
blank / shuffled / prior and says so. Blank and shuffled images are weak controls for yes/no questions (answer
priors alone keep most of their score); counterfactual images are sharp ones. The multi-modal gain (MMStar: the
score with the image minus the score without it, here with a blank image) and the answer-change shares are reported
under those names.

`--answers-file F` shares the real-image answers with `generate-vqa`: the answers F already holds are used (when
`generate-vqa` or an earlier audit wrote them with the same model and decoding settings; other settings are refused),
the missing ones are generated and appended in its format, so that an evaluation answers the real images once.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from exgra_med.data.images import load_image
from exgra_med.errors import HelpFormatter, UserError
from exgra_med.eval.baselines import (
    TABLE_COLUMNS,
    format_comparison,
    majority_predictions,
    question_prior_predictions,
    summarize,
)
from exgra_med.eval.card import RunCard, file_entry
from exgra_med.eval.counterfactual import counterfactual_questions, counterfactual_rows, known_truth, pair_rows
from exgra_med.eval.generate import (
    add_answer_arguments,
    answer_kwargs,
    answer_records,
    append_answers,
    check_answers_folder,
    load_model,
    load_questions,
    pending_questions,
    provenance,
    resolve_settings,
)
from exgra_med.eval.launch import check_answers_file
from exgra_med.eval.metrics import candidate_answers, score_vqa
from exgra_med.io import read_json, write_json_atomic
from exgra_med.model.backend import Backend
from exgra_med.model.options import DecodingOptions, ModelOptions

logger = logging.getLogger(__name__)

CONDITIONS = ("real images", "blank images", "shuffled images")
COUNTERFACTUAL_SETTINGS = ("auto", "on", "off")  # auto: on when the truth of the images is known


def shuffled_images(records: Sequence[Mapping[str, Any]], seed: int) -> list[dict]:
    """Copies of `records` with each image replaced by another one of the set (seeded). The distinct images form
    one random cycle, so with two or more of them no question keeps its own image, even where several questions
    share one image."""
    distinct = sorted({r["image"] for r in records if r.get("image")})
    random.Random(seed).shuffle(distinct)
    swap = {image: distinct[(k + 1) % len(distinct)] for k, image in enumerate(distinct)}
    return [{**r, "image": swap[r["image"]]} if r.get("image") else dict(r) for r in records]


def blank_images(records: Sequence[Mapping[str, Any]], image_folder: str | Path | None, out_dir: Path) -> list[dict]:
    """Copies of `records` whose images are white images of the original sizes, written to `out_dir` (absolute
    paths, so the image folder still joins them unchanged)."""
    out, made = [], {}
    for r in records:
        r = dict(r)
        if r.get("image"):
            size = load_image(Path(image_folder or ".") / r["image"]).size
            if size not in made:
                path = out_dir / f"blank_{size[0]}x{size[1]}.png"
                Image.new("RGB", size, (255, 255, 255)).save(path)
                made[size] = str(path.resolve())
            r["image"] = made[size]
        out.append(r)
    return out


def changed_fraction(reference: Mapping[str, str], other: Mapping[str, str]) -> float:
    """Percentage of questions whose answer differs from the real-image answer (normalised for case/space)."""
    keys = list(reference)
    if not keys:
        return 0.0
    differ = sum(reference[k].strip().lower() != other.get(k, "").strip().lower() for k in keys)
    return 100.0 * differ / len(keys)


def audit(
    backend: Backend, questions: Sequence[dict], candidates, *, image_folder: str | Path | None,
    train: Sequence[Mapping] | None = None, seed: int = 0, real_answers: Mapping[str, str] | None = None,
    counterfactual: str = "auto", **generate_kwargs,
) -> dict[str, Any]:
    """Answers under each condition, their scores (overall / closed / open), the multi-modal gain and how many
    answers the image changes; the majority and question-prior baselines when training records are given; the
    counterfactual controls (`counterfactual`: auto = when the truth is known, on = required, off). `real_answers`
    (`{str(id): answer}` for every question, e.g. from an answers file) are used instead of answering the real
    images again."""
    if counterfactual not in COUNTERFACTUAL_SETTINGS:
        raise ValueError(f"counterfactual must be one of {COUNTERFACTUAL_SETTINGS}, got {counterfactual!r}")
    truth, unknown = known_truth(questions, image_folder) if counterfactual != "off" else ({}, "turned off")
    if counterfactual == "on" and unknown:
        raise ValueError(f"counterfactual controls need the truth of the images: {unknown}")
    answers: dict[str, dict[str, str]] = {}
    if real_answers is not None:
        missing = [str(q["id"]) for q in questions if str(q["id"]) not in real_answers]
        if missing:
            raise ValueError(f"real_answers lacks {len(missing)} of the questions, e.g. id {missing[0]!r}")
        answers["real images"] = {str(q["id"]): real_answers[str(q["id"])] for q in questions}
    with tempfile.TemporaryDirectory(prefix="grounding-audit-") as tmp:
        if truth:  # built first: bad data is refused before anything is answered
            edited, paired = counterfactual_questions(questions, truth, image_folder, Path(tmp), seed)
        variants = {
            "real images": [dict(q) for q in questions],
            "blank images": blank_images(questions, image_folder, Path(tmp)),
            "shuffled images": shuffled_images(questions, seed),
        }
        for name, records in variants.items():
            if name in answers:
                continue
            logger.info("answering %d questions with %s", len(records), name)
            answers[name] = answer_records(backend, records, image_folder=image_folder, **generate_kwargs)
        if truth:
            logger.info("answering %d questions on counterfactual images, %d paired questions", len(edited),
                        len(paired))
            edited_answers = answer_records(backend, edited, image_folder=image_folder, **generate_kwargs)
            pair_answers = (answer_records(backend, paired, image_folder=image_folder, **generate_kwargs)
                            if paired else {})
    rows = {name: summarize(score_vqa(questions, answers[name], candidates)) for name in CONDITIONS}
    if train is not None:
        rows["majority answer"] = summarize(score_vqa(questions, majority_predictions(train, questions), candidates))
        rows["question prior"] = summarize(
            score_vqa(questions, question_prior_predictions(train, questions), candidates)
        )
    real = answers["real images"]
    controls: dict[str, Any] = {"setting": counterfactual, "used": bool(truth), "note": unknown}
    if truth:
        controls.update({
            "images": len(truth),
            "images_without_truth": len({q.get("image") for q in questions} - set(truth)),
            "rows": counterfactual_rows(edited, edited_answers, real),
            "pairs": pair_rows(paired, questions, real, pair_answers),
            "answers": {"counterfactual images": edited_answers, "paired questions": pair_answers},
        })
    return {
        "questions": len(questions),
        "closed": sum(q.get("answer_type") == "CLOSED" for q in questions),
        "seed": seed,
        "rows": rows,
        "multimodal_gain": {key: rows["real images"][key] - rows["blank images"][key] for _, key in TABLE_COLUMNS},
        "answers_changed_vs_real": {name: changed_fraction(real, answers[name]) for name in CONDITIONS[1:]},
        "counterfactual": controls,
        "answers": answers,
    }


def _share(value: Mapping[str, Any]) -> str:
    low, high = value["ci95"]
    return f"{value['percent']:.1f} [{low:.1f}-{high:.1f}]"


def format_counterfactual(controls: Mapping[str, Any]) -> str:
    """The counterfactual rows (shares in % with Wilson 95% intervals), or the line saying why there are none."""
    if not controls.get("used"):
        return (f"counterfactual controls: none ({controls.get('note')}); blank, shuffled and prior rows only, which "
                "are weak controls for yes/no questions")
    lines = [
        f"counterfactual controls ({controls['images']} images of known truth): each question asked on its image "
        "edited so that its answer changes; % of answers [Wilson 95% interval]; right on both images: right on the "
        "real image and following the new truth on the edited one (0 for a model that ignores the image)",
        "| question kind | edit | n | follows new truth | stays with old | neither | right on both images | answer "
        "changed |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in controls["rows"].items():
        lines.append(f"| {kind} | {row['edit']} | {row['n']} | " + " | ".join(
            _share(row[name]) for name in ("new", "old", "neither", "both", "changed")) + " |")
    if controls["pairs"]:
        lines += ["paired yes/no questions (the question and the same question about the other value, real image):",
                  "| question kind | pairs | both right | question right |", "|---|---:|---:|---:|"]
        for kind, row in controls["pairs"].items():
            lines.append(f"| {kind} | {row['n']} | {_share(row['both right'])} | {_share(row['question right'])} |")
    return "\n".join(lines)


def format_audit(result: Mapping[str, Any]) -> str:
    """The printed report: the comparison table, the multi-modal gain, the answer-change shares and the
    counterfactual controls."""
    n, closed = result["questions"], result["closed"]
    changed = ", ".join(f"{name} {value:.1f}%" for name, value in result["answers_changed_vs_real"].items())
    gain = ", ".join(f"{column} {result['multimodal_gain'][key]:+.2f}" for column, key in TABLE_COLUMNS)
    return "\n".join([
        f"grounding audit: {n} questions ({closed} closed, {n - closed} open); overall = mean of closed accuracy "
        "and open recall, in %",
        format_comparison(result["rows"]),
        f"multi-modal gain (MMStar; real minus blank images, points): {gain}",
        f"answer-change share (answers that differ from the real-image answers): {changed}",
        format_counterfactual(result["counterfactual"]),
    ])

# grounding-audit has no --restart: an answers file of other settings is the user's to remove.
AUDIT_ADVICE = "Write to another --answers-file, or delete this one to generate its answers again."


def build_parser() -> argparse.ArgumentParser:
    """The flags of `exgra-med grounding-audit`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med grounding-audit", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    add_answer_arguments(parser)
    parser.add_argument("--question-file", required=True, help="VQA records (JSON list), e.g. test.json")
    parser.add_argument("--candidate", required=True, help='candidate.json ({"0": [answers]}) of the data set')
    parser.add_argument("--train", default=None, help="training records: adds the answer-prior baselines")
    parser.add_argument("--out", default=None,
                        help="write the audit (scores, answers) as JSON here, and its reproducibility card beside it "
                        "(audit.json -> audit.card.json)")
    parser.add_argument("--answers-file", default=None,
                        help="the real-image answers (generate-vqa's JSON lines): used where present, the missing ones "
                        "generated and appended")
    parser.add_argument("--counterfactual", choices=COUNTERFACTUAL_SETTINGS, default="auto",
                        help="counterfactual controls (edited images, paired questions): auto = when the truth of the "
                        "images is known (easy-VQA), on = required, off = none")
    return parser


def card_settings(args: argparse.Namespace, options: ModelOptions, generation: Mapping[str, Any]) -> dict[str, Any]:
    """What the audit's numbers depend on, for its reproducibility card: the answers' generation settings
    (`provenance`: model, weights, template, decoding), where they were computed, the input files and the audit's
    own flags."""
    return {
        "generation": dict(generation),
        "placement": {"device": options.device, "attn_implementation": options.attn_implementation},
        "question_file": file_entry(args.question_file),
        "candidate": file_entry(args.candidate),
        "train": file_entry(args.train) if args.train else None,
        "image_folder": str(Path(args.image_folder).resolve()) if args.image_folder else None,
        "answers_file": file_entry(args.answers_file) if args.answers_file else None,
        "batch_size": args.batch_size,
        "counterfactual": args.counterfactual,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med grounding-audit --model DIR --question-file test.json --image-folder D --candidate F [...]`; with
    `--out`, the reproducibility card goes beside OUT (`exgra_med.eval.card`)."""
    card = RunCard("grounding-audit", argv)
    args = build_parser().parse_args(argv)
    options, decoding = ModelOptions.from_args(args), DecodingOptions.from_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    questions = load_questions(args.question_file)
    candidates = read_json(args.candidate)
    try:  # its shape is checked before the model loads
        candidate_answers(candidates)
    except ValueError as e:
        raise UserError(f"{args.candidate}: {e}") from e
    if args.counterfactual == "on":  # refused before the model loads
        unknown = known_truth(questions, args.image_folder)[1]
        if unknown:
            raise UserError(f"--counterfactual on needs the truth of the images: {unknown}")
    train = read_json(args.train) if args.train else None
    options = resolve_settings(options)
    # the settings generate-vqa records (the audit's own flags do not change an answer): answers file and card
    generation = provenance(options, decoding, args.strip_role_prefix)
    real = None
    if args.answers_file:
        check_answers_file(args.answers_file, {"--question-file": args.question_file, "--candidate": args.candidate,
                                               "--train": args.train})
        check_answers_folder(args.answers_file)
        # refused here, before the model loads
        rows, todo = pending_questions(args.answers_file, questions, generation, advice=AUDIT_ADVICE)
        real = {str(r["question_id"]): r["text"] for r in rows}
        logger.info("%s: %d of the %d real-image answers to generate", args.answers_file, len(todo), len(questions))
    backend = load_model(options, decoding.seed)
    answering = answer_kwargs(args)
    if args.answers_file and todo:
        real.update(append_answers(args.answers_file, generation, backend, todo, model_id=Path(options.model).name,
                                   **answering))
    result = audit(backend, questions, candidates, train=train, seed=decoding.seed, real_answers=real,
                   counterfactual=args.counterfactual, **answering)
    print(format_audit(result))
    if args.out:
        write_json_atomic(args.out, {**result, "model": options.model})
        written = card.write(args.out, card_settings(args, options, generation), seed=decoding.seed)
        print(f"audit written to {args.out} (reproducibility card: {written})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
