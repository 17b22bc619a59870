"""Batched VQA answer generation (`exgra-med generate-vqa`), the reference's `model_vqa_med.py`.

A question record (`id`, `image`, `conversations`, as prepared) becomes the `simple` evaluation prompt:
the first human turn without `<image>`, then (if the record has an image) a new line and the image
placeholder expanded to the model's number of image tokens. Prompts are LEFT padded and decoded
greedily in batches with the LLM's KV cache, up to 1024 new tokens as the reference; each row stops at the
template's stop string ("###") and the answer is cut there and stripped of white space. As in the reference,
a leading "Assistant:" that the model writes after `simple`'s "###" stays in the answer (it lowers exact match,
F1, precision and BLEU of open questions, not open recall or closed accuracy); `--strip-role-prefix` drops it.
Questions are sorted by prompt length so that a batch holds prompts of similar length; the answers file
is JSON lines `{question_id, prompt, text, answer_id, model_id, metadata}` in that order
(`exgra_med.eval.launch` merges chunks back into question order). The file is flushed after every batch
and a rerun skips the question ids it already holds.
Each line's `metadata.generation` records what produced it (model folder, template, decoding settings): a
rerun with other settings refuses to resume the file (`--restart` replaces it), so that answers are never
credited to the wrong model. The model and decoding flags are the shared groups of `exgra_med.model.options`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.data.images import DEFAULT_ASPECT_RATIO
from exgra_med.data.records import question_text
from exgra_med.errors import HelpFormatter, UserError, one_line
from exgra_med.eval.launch import check_answers_file, get_chunk, read_answer_lines
from exgra_med.io import read_json
from exgra_med.model.auto import (
    backend_for,
    choose_setting,
    load_backend,
    model_family,
    recorded_settings,
    resolve_model_path,
)
from exgra_med.model.backend import Backend, Prompt
from exgra_med.model.checkpoint import weights_fingerprint
from exgra_med.model.hub import resolve_path
from exgra_med.model.native.backend import CHAT_TEMPLATE_NAME
from exgra_med.model.options import DecodingOptions, ModelOptions

logger = logging.getLogger(__name__)

# (record, answer text) of the questions answered by one batch.
BatchCallback = Callable[[list[tuple[dict, str]]], None]


def display_prompt(record: dict) -> str:
    """The `prompt` field of an answer line: the question, plus "\\n<image>" when the record has an image."""
    text = question_text(record)
    return f"{text}\n{DEFAULT_IMAGE_TOKEN}" if "image" in record else text


def generate_batch(backend: Backend, prompts: Sequence[Prompt], max_new_tokens: int = 1024, temperature: float = 0.0,
                   strip_role_prefix: bool = False, **generate_kwargs) -> list[str]:
    """Answers of one batch of encoded prompts (left padded, decoded together with the KV cache, cut at the stop
    string; with `strip_role_prefix`, a leading "Assistant:", which the reference keeps, is dropped)."""
    return backend.answer_batch(prompts, max_new_tokens, temperature, strip_role_prefix, **generate_kwargs)


def answer_records(
    backend: Backend, records: Sequence[dict], batch_size: int = 16, max_new_tokens: int = 1024, *,
    image_folder: str | os.PathLike | None = None, strip_role_prefix: bool = False, temperature: float = 0.0,
    on_batch: BatchCallback | None = None, errors: dict[str, str] | None = None, progress: bool = False,
    generate_kwargs: dict[str, Any] | None = None,
) -> dict[str, str]:
    """`{str(id): answer}` for `records` (any model family), generated in batches of prompts sorted by length
    (longest first; ties keep question order).

    `on_batch` is called after each batch. With an `errors` dict, a record whose image cannot be read or
    whose generation fails is recorded there (`id -> message`) and skipped; without it, errors raise.
    `generate_kwargs` go to `generate` (e.g. `synced_gpus=True` under ZeRO-3 / FSDP2).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lengths = [backend.question_length(r) for r in records]
    limit = backend.context_length  # the maximum length the model was trained with, or its positions
    too_long = [str(records[i]["id"]) for i, n in enumerate(lengths) if limit is not None and n > limit]
    if too_long:
        logger.warning("%d questions (ids %s) are longer than the model's %d-token context (the length it was "
                       "trained with or its positions); their answers are unreliable", len(too_long),
                       ", ".join(too_long[:5]) + (" ..." if len(too_long) > 5 else ""), limit)
    order = sorted(range(len(records)), key=lambda i: -lengths[i])
    kwargs = {"strip_role_prefix": strip_role_prefix, **(generate_kwargs or {})}
    was_training = backend.training
    backend.eval()
    try:
        return answer_in_batches(
            records, order, batch_size, lambda i: backend.encode_question(records[i], image_folder),
            lambda batch, prompts: generate_batch(backend, prompts, max_new_tokens, temperature, **kwargs),
            on_batch=on_batch, errors=errors, progress=progress,
        )
    finally:
        backend.train(was_training)


def generate_answers(
    model, processing, image_processor, records: Sequence[dict], batch_size: int = 16, conv_mode: str = "simple",
    max_new_tokens: int = 1024, *, image_aspect_ratio: str = DEFAULT_ASPECT_RATIO, **kwargs: Any,
) -> dict[str, str]:
    """`answer_records` for a model in memory (training's VQA scoring, tests): the model with its tokenizer and
    image processor, or a native VLM with its processor, wrapped in its back end (`exgra_med.model.auto.backend_for`)
    with the `conv_mode` template and `image_aspect_ratio` preprocessing."""
    backend = backend_for(model, processing, image_processor, conv_mode, image_aspect_ratio)
    return answer_records(backend, records, batch_size, max_new_tokens, **kwargs)


def answer_in_batches(
    records: Sequence[dict], order: Sequence[int], batch_size: int, prepare: Callable[[int], Any],
    generate: Callable[[list[int], list[Any]], list[str]], *, on_batch: BatchCallback | None = None,
    errors: dict[str, str] | None = None, progress: bool = False,
) -> dict[str, str]:
    """`{str(id): answer}` for `records` taken in `order`, `batch_size` at a time: `prepare(i)` reads record i's
    inputs (its prompt and image), `generate(indices, prepared)` answers a batch.

    `on_batch` is called after each batch with its `(record, text)` pairs. With an `errors` dict, a record whose
    image cannot be read, or whose generation fails alone, is recorded there (`id -> message`) and skipped (a failed
    batch is retried one question at a time); without it, errors raise, an unreadable image naming its record.
    """
    answers: dict[str, str] = {}
    bar = None
    if progress:
        bar = tqdm(total=len(order), desc="answers", unit="q")
    try:
        for start in range(0, len(order), batch_size):
            batch = list(order[start : start + batch_size])
            done = _answer_batch(records, batch, prepare, generate, errors)
            answers.update({str(record["id"]): text for record, text in done})
            if on_batch is not None and done:
                on_batch(done)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return answers


def _answer_batch(records, batch, prepare, generate, errors) -> list[tuple[dict, str]]:
    keep, prepared = [], []
    for i in batch:
        record = records[i]
        try:
            prepared.append(prepare(i))
            keep.append(i)
        except Exception as e:
            if errors is None:
                raise ValueError(f"record {record.get('id')!r}: {e}") from e
            errors[str(record.get("id"))] = f"image: {type(e).__name__}: {e}"
    if not keep:
        return []
    try:
        texts = generate(keep, prepared)
    except Exception as e:
        if errors is None:
            raise
        if len(keep) == 1:
            errors[str(records[keep[0]].get("id"))] = f"generation: {type(e).__name__}: {e}"
            return []
        logger.warning("batch of %d failed (%s); retrying its questions one by one", len(keep), e)
        out: list[tuple[dict, str]] = []
        for i in keep:
            out += _answer_batch(records, [i], prepare, generate, errors)
        return out
    return [(records[i], t) for i, t in zip(keep, texts)]


def answer_line(record: dict, text: str, model_id: str, generation: dict | None = None) -> dict:
    """One answers-file line in the reference layout; `generation` (the run's `provenance`) goes in `metadata`."""
    metadata = {"generation": generation} if generation is not None else {}
    return {"question_id": record["id"], "prompt": display_prompt(record), "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": metadata}


# Settings that do not change the answers (where and how fast they are computed): not recorded.
NOT_PROVENANCE = ("device", "attn_implementation")
# Settings recorded only when they differ from these values: answers files written before these flags existed lack
# them, and files of either version then resume (and merge, `exgra_med.eval.launch`) with each other.
RECORDED_WHEN_SET = {"vision_tower": None, "bits": 16, "top_p": 1.0}
# Keys an answers file has recorded since before a flag's rename: files of either version keep the same key.
RECORDED_AS = {"conv_template": "conv_mode"}


def provenance(model: ModelOptions, decoding: DecodingOptions, strip_role_prefix: bool = False) -> dict:
    """What produced an answers file: the model folder (resolved) and a fingerprint of its weights
    (`weights_fingerprint`: a model retrained into the same folder differs), its template and image settings
    (concrete: `resolve_settings`), the weights dtype and bits, and every decoding setting."""
    settings = {**vars(model), **vars(decoding), "strip_role_prefix": strip_role_prefix}
    recorded = {}
    for key, value in sorted(settings.items()):
        if key in NOT_PROVENANCE or (key in RECORDED_WHEN_SET and value == RECORDED_WHEN_SET[key]):
            continue
        # A local folder by its resolved path, a Hub id as given (owner/name[@revision]).
        if key in ("model", "vision_tower") and Path(value).exists():
            value = str(Path(value).resolve())
        recorded[RECORDED_AS.get(key, key)] = value
    try:
        fingerprint = weights_fingerprint(resolve_model_path(model.model))
    except (OSError, ValueError):  # not a local folder or a cached Hub id: loading reports it
        fingerprint = None
    if fingerprint is not None:
        recorded["weights"] = fingerprint
    return recorded


# What to do about an answers file of other settings: generate-vqa can replace it, grounding-audit cannot.
RESTART_ADVICE = "Write to another --answers-file, or pass --restart to replace this one."


def check_provenance(path: str | os.PathLike, rows: Sequence[dict], expected: dict,
                     advice: str = RESTART_ADVICE) -> None:
    """Refuse to resume an answers file whose lines were produced otherwise than `expected` says (a `UserError`
    naming the file and the settings that differ, ending with the command's `advice`)."""
    for row in rows:
        found = (row.get("metadata") or {}).get("generation")
        if isinstance(found, dict) and "weights" not in found:  # a line from before the weights fingerprint
            found = {**found, "weights": expected.get("weights")}
        if found == expected:
            continue
        if not isinstance(found, dict):
            why = "it does not record the model and settings that produced them (an older file)"
        else:
            keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            why = "; ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in keys)
            if "weights" in keys:
                why = f"the model's weights changed since they were written (retrained into the same folder?); {why}"
        raise UserError(
            f"{path}: holds {len(rows)} answers that this run would not give ({why}); refusing to mix them. {advice}"
        )


def pending_questions(
    path: str | os.PathLike, questions: Sequence[dict], generation: dict, advice: str = RESTART_ADVICE
) -> tuple[list[dict], list[dict]]:
    """(the complete lines already in the answers file `path`, the `questions` it does not answer yet). Refuses
    (`check_provenance`, with `advice`) a file written with other settings than `generation`; a torn last line is
    cut off."""
    rows = read_answer_lines(path, repair=True)
    check_provenance(path, rows, generation, advice)
    done = {str(r["question_id"]) for r in rows}
    return rows, [r for r in questions if str(r["id"]) not in done]


def append_answers(
    path: str | os.PathLike, generation: dict, backend: Backend, records: Sequence[dict], *, model_id: str,
    **generate_kwargs: Any,
) -> dict[str, str]:
    """`answer_records` for `records`, each batch appended to the answers file `path` (flushed and synced) as
    lines of `model_id` recording `generation`, so that an interrupted run resumes with `pending_questions`."""
    with Path(path).open("a", encoding="utf-8") as f:

        def write(batch: list[tuple[dict, str]]) -> None:
            f.write("".join(json.dumps(answer_line(r, t, model_id, generation), ensure_ascii=False) + "\n"
                            for r, t in batch))
            f.flush()
            os.fsync(f.fileno())

        return answer_records(backend, records, on_batch=write, **generate_kwargs)


def resolve_settings(options: ModelOptions) -> ModelOptions:
    """`options` with the template and image aspect ratio made concrete when not given: what the checkpoint was
    trained with, else `simple` (the reference's eval prompt) and `square`; `chat_template` for a transformers-native
    VLM (its own template). A flag that disagrees with the checkpoint wins, with a warning."""
    recorded = recorded_settings(options.model)
    if model_family(options.model) == "native":
        if options.conv_template not in (None, CHAT_TEMPLATE_NAME):  # e.g. scripts/eval_vqa.sh's `simple`
            logger.warning("--conv-template %s ignored: %s is a transformers-native VLM, prompted with its own chat "
                           "template", options.conv_template, options.model)
        template = CHAT_TEMPLATE_NAME
    else:
        template = choose_setting("conv_template", options.conv_template, recorded, "simple", options.model)
    aspect = choose_setting("image_aspect_ratio", options.image_aspect_ratio, recorded, DEFAULT_ASPECT_RATIO,
                            options.model)
    return replace(options, conv_template=template, image_aspect_ratio=aspect)


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def load_questions(path: str | os.PathLike) -> list[dict]:
    """A VQA question file (JSON list of records with unique `id`s, an `image` file name or none); errors name the
    file and record."""
    records = read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of question records")
    seen: set[str] = set()
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record #{i} is {_JSON_TYPES.get(type(r), type(r).__name__)}, not an object "
                            "(a question record)")
        if "id" not in r:
            raise ValueError(f"{path}: record #{i} has no 'id'")
        image = r.get("image", "")
        if image is None:
            raise UserError(f"{path}: record #{i} (id {r['id']}): 'image' is null; give an image file name, or leave "
                            "'image' out for a question without one")
        if not isinstance(image, str):
            kind = _JSON_TYPES.get(type(image), "a value")
            raise UserError(f"{path}: record #{i} (id {r['id']}): 'image' is {kind}; give an image file name")
        if str(r["id"]) in seen:
            raise ValueError(f"{path}: record #{i} repeats id {r['id']!r}")
        seen.add(str(r["id"]))
        question_text(r)
    return records


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (refused when the flags are parsed, before any model loads)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def check_answers_folder(path: str | os.PathLike) -> None:
    """Refuse an answers file whose folder does not exist (a mistyped path would silently become new folders), before
    the model loads. The one folder made for it is generate-vqa-multi's chunk folder (`<answers file>.chunks/`),
    next to an answers file whose folder exists."""
    folder = Path(path).parent
    if folder.is_dir() or (folder.name.endswith(".chunks") and folder.parent.is_dir()):
        return
    raise UserError(f"--answers-file {path}: the folder {folder} does not exist; create it first")


def add_answer_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 1024,
                         temperature: float = 0.0) -> None:
    """The flags of the commands that answer VQA records (`generate-vqa`, `zero-shot`, `grounding-audit`): the shared
    model and decoding groups (decoding defaults: the reference's for the command) and the answer loop's own."""
    ModelOptions.add_arguments(parser)
    DecodingOptions.add_arguments(parser, max_new_tokens=max_new_tokens, temperature=temperature)
    group = parser.add_argument_group("answering", "the batched answer loop")
    group.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to")
    group.add_argument("--batch-size", type=positive_int, default=16, help="questions answered together")
    group.add_argument("--strip-role-prefix", action="store_true",
                       help='drop a leading "Assistant:" from answers (the reference keeps it; moves open EM/F1/'
                       "precision/BLEU, not open recall or closed accuracy)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def answer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`answer_records` keyword arguments from the flags of `add_answer_arguments`."""
    decoding = DecodingOptions.from_args(args)
    # top_p 1 adds nothing, so that a native VLM samples with its own generation_config as before this flag.
    extra = {"top_p": decoding.top_p} if decoding.top_p != 1.0 else {}
    return dict(batch_size=args.batch_size, max_new_tokens=decoding.max_new_tokens, image_folder=args.image_folder,
                strip_role_prefix=args.strip_role_prefix, temperature=decoding.temperature, progress=not args.quiet,
                generate_kwargs=extra)


def load_model(options: ModelOptions, seed: int = 0) -> Backend:
    """The back end of the model `options` name (the template of a checkpoint that records none: `simple`, the
    reference's eval prompt); seeds torch with `seed`."""
    torch.manual_seed(seed)
    return load_backend(options.model, options.load_options(), default_template="simple")


def build_parser() -> argparse.ArgumentParser:
    """The flags of `exgra-med generate-vqa`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med generate-vqa", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    add_answer_arguments(parser)
    parser.add_argument("--question-file", required=True, help="VQA records (JSON list), e.g. test.json")
    parser.add_argument("--answers-file", required=True, help="JSON-lines output; a rerun resumes it")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks")
    parser.add_argument("--chunk-idx", type=int, default=0, help="the chunk this run answers (0-based)")
    parser.add_argument("--restart", action="store_true",
                        help="replace an existing answers file instead of resuming it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med generate-vqa --model DIR --question-file F --image-folder D --answers-file F [...]`."""
    args = build_parser().parse_args(argv)
    options, decoding = ModelOptions.from_args(args), DecodingOptions.from_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if Path(options.model).exists() and not Path(options.model).is_dir():
        raise UserError(f"--model {options.model}: not a folder")
    try:  # a Hub id: found in the cache or downloaded
        resolve_path(options.model, "model", require=("config.json",))
    except FileNotFoundError as e:
        raise UserError(f"--model {one_line(e)}") from e
    questions = get_chunk(load_questions(args.question_file), args.num_chunks, args.chunk_idx)
    out = Path(args.answers_file)
    options = resolve_settings(options)
    generation = provenance(options, decoding, args.strip_role_prefix)
    check_answers_file(out, {"--question-file": args.question_file})
    check_answers_folder(out)
    if args.restart and out.exists():
        read_answer_lines(out)  # only an answers file is replaced (NotAnswersFileError otherwise)
        logger.info("--restart: replacing %s", out)
        out.unlink()
    _, todo = pending_questions(out, questions, generation)
    logger.info("%s chunk %d/%d: %d questions, %d already answered, %d to go", args.question_file,
                args.chunk_idx, args.num_chunks, len(questions), len(questions) - len(todo), len(todo))
    out.parent.mkdir(exist_ok=True)  # generate-vqa-multi's chunk folder (check_answers_folder)
    if not todo:
        out.touch()
        return 0
    backend = load_model(options, decoding.seed)
    append_answers(out, generation, backend, todo, model_id=Path(options.model).name, **answer_kwargs(args))
    print(f"{len(todo)} answers written to {out}")
    return 0
