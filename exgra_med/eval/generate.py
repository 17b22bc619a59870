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
credited to the wrong model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.conversation import TEMPLATES
from exgra_med.data.images import ASPECT_RATIOS, DEFAULT_ASPECT_RATIO
from exgra_med.data.records import question_text
from exgra_med.errors import UserError, one_line
from exgra_med.eval.launch import get_chunk, read_answer_lines
from exgra_med.io import read_json
from exgra_med.model.auto import (
    DTYPES,
    LoadOptions,
    backend_for,
    choose_setting,
    load_backend,
    model_family,
    recorded_settings,
)
from exgra_med.model.backend import Backend, Prompt
from exgra_med.model.hub import resolve_path
from exgra_med.model.native.backend import CHAT_TEMPLATE_NAME

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
        from tqdm.auto import tqdm

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


# Flags that do not change the answers (where and how fast they are computed, which questions); the others are
# recorded as the provenance of an answers file.
NOT_PROVENANCE = {"image_folder", "batch_size", "device", "attn_implementation", "quiet", "question_file",
                  "answers_file", "num_chunks", "chunk_idx", "restart"}


def provenance(args: argparse.Namespace) -> dict:
    """What produced an answers file: the model folder (resolved), the template and every decoding flag."""
    recorded = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_PROVENANCE}
    # A local folder by its resolved path, a Hub id as given (owner/name[@revision]).
    recorded["model"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    return recorded


def check_provenance(path: str | os.PathLike, rows: Sequence[dict], expected: dict) -> None:
    """Refuse to resume an answers file whose lines were produced otherwise than `expected` says (a `UserError`
    naming the file and the settings that differ)."""
    for row in rows:
        found = (row.get("metadata") or {}).get("generation")
        if found == expected:
            continue
        if not isinstance(found, dict):
            why = "it does not record the model and settings that produced them (an older file)"
        else:
            keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            why = "; ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in keys)
        raise UserError(
            f"{path}: holds {len(rows)} answers that this run would not give ({why}); refusing to mix them. "
            "Write to another --answers-file, or pass --restart to replace this one."
        )


def pending_questions(
    path: str | os.PathLike, questions: Sequence[dict], generation: dict
) -> tuple[list[dict], list[dict]]:
    """(the complete lines already in the answers file `path`, the `questions` it does not answer yet). Refuses
    (`check_provenance`) a file written with other settings than `generation`; a torn last line is cut off."""
    rows = read_answer_lines(path, repair=True)
    check_provenance(path, rows, generation)
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


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill `--conv-mode` and `--image-aspect-ratio` when not given: what the checkpoint was trained with, else
    `simple` (the reference's eval prompt) and `square`; `chat_template` for a transformers-native VLM (its own
    template). A flag that disagrees with the checkpoint wins, with a warning. Stored back into `args`."""
    recorded = recorded_settings(args.model)
    if model_family(args.model) == "native":
        if args.conv_mode not in (None, CHAT_TEMPLATE_NAME):  # e.g. scripts/eval_vqa.sh's `simple`
            logger.warning("--conv-mode %s ignored: %s is a transformers-native VLM, prompted with its own chat "
                           "template", args.conv_mode, args.model)
        args.conv_mode = CHAT_TEMPLATE_NAME
    else:
        args.conv_mode = choose_setting("conv_template", args.conv_mode, recorded, "simple", args.model)
    aspect = getattr(args, "image_aspect_ratio", None)
    args.image_aspect_ratio = choose_setting("image_aspect_ratio", aspect, recorded, DEFAULT_ASPECT_RATIO, args.model)
    return args


def load_questions(path: str | os.PathLike) -> list[dict]:
    """A VQA question file (JSON list of records with unique `id`s); errors name the file and record."""
    records = read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of question records")
    seen: set[str] = set()
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "id" not in r:
            raise ValueError(f"{path}: record #{i} has no 'id'")
        if str(r["id"]) in seen:
            raise ValueError(f"{path}: record #{i} repeats id {r['id']!r}")
        seen.add(str(r["id"]))
        question_text(r)
    return records


def add_model_args(parser: argparse.ArgumentParser, max_new_tokens: int = 1024, temperature: float = 0.0) -> None:
    """Flags shared by `generate-vqa`, `zero-shot` and `grounding-audit`: the model, its device and the decoding
    settings (defaults: the reference's for the command)."""
    parser.add_argument("--model", required=True,
                        help="ExGra-Med checkpoint or transformers-native VLM folder, or a Hub id")
    parser.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--conv-mode", default=None, choices=sorted(TEMPLATES),
                        help="prompt template (default: the one the checkpoint was trained with, else simple, the "
                        "reference's eval prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"answer length limit (default {max_new_tokens}, the reference's)")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"0 = greedy; > 0 samples (default {temperature}, the reference's)")
    parser.add_argument("--strip-role-prefix", action="store_true",
                        help='drop a leading "Assistant:" from answers (the reference keeps it; moves open EM/F1/'
                             "precision/BLEU, not open recall or closed accuracy)")
    parser.add_argument("--image-aspect-ratio", default=None, choices=ASPECT_RATIOS,
                        help="square: the processor's resize + centre crop (reference); pad: pad to a square first "
                        f"(default: the one the checkpoint was trained with, else {DEFAULT_ASPECT_RATIO})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--seed", type=int, default=0, help="only matters with --temperature > 0")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`answer_records` keyword arguments from the parsed `add_model_args` flags."""
    return dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, image_folder=args.image_folder,
                strip_role_prefix=args.strip_role_prefix, temperature=args.temperature, progress=not args.quiet)


def load_model(args: argparse.Namespace) -> Backend:
    """The back end of the model the parsed `add_model_args` flags name (settings from `resolve_settings`); seeds
    torch."""
    torch.manual_seed(args.seed)
    resolve_settings(args)
    # "auto": LoadOptions' defaults (cuda when available; bfloat16 on CUDA, float32 on the CPU)
    options = LoadOptions(device=None if args.device == "auto" else args.device,
                          dtype=None if args.dtype == "auto" else DTYPES[args.dtype],
                          attn_implementation=args.attn_implementation, template=args.conv_mode,
                          image_aspect_ratio=args.image_aspect_ratio)
    return load_backend(args.model, options, default_template="simple")


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med generate-vqa --model DIR --question-file F --image-folder D --answers-file F [...]`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med generate-vqa", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(parser)
    parser.add_argument("--question-file", required=True, help="VQA records (JSON list), e.g. test.json")
    parser.add_argument("--answers-file", required=True, help="JSON-lines output; a rerun resumes it")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--restart", action="store_true",
                        help="replace an existing answers file instead of resuming it")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if Path(args.model).exists() and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: not a folder")
    try:  # a Hub id: found in the cache or downloaded
        resolve_path(args.model, "model", require=("config.json",))
    except FileNotFoundError as e:
        raise UserError(f"--model {one_line(e)}") from e
    questions = get_chunk(load_questions(args.question_file), args.num_chunks, args.chunk_idx)
    out = Path(args.answers_file)
    resolve_settings(args)
    generation = provenance(args)
    if args.restart and out.exists():
        logger.info("--restart: replacing %s", out)
        out.unlink()
    _, todo = pending_questions(out, questions, generation)
    logger.info("%s chunk %d/%d: %d questions, %d already answered, %d to go", args.question_file,
                args.chunk_idx, args.num_chunks, len(questions), len(questions) - len(todo), len(todo))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        out.touch()
        return 0
    backend = load_model(args)
    append_answers(out, generation, backend, todo, model_id=Path(args.model).name, **decoding_kwargs(args))
    print(f"{len(todo)} answers written to {out}")
    return 0
