"""Answer generation: prompt layout, batched == one-by-one greedy answers, answers files, resume, chunks + merge."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from exgra_med.conversation import get_template
from exgra_med.data.records import question_text
from exgra_med.eval.generate import display_prompt, generate_answers, get_chunk, main, read_answer_lines
from exgra_med.eval.launch import chunk_commands, chunk_path, merge_answers
from exgra_med.model.backend import StopOnString
from exgra_med.model.checkpoint import weights_fingerprint
from exgra_med.model.llava_backend import LlavaBackend, left_pad
from exgra_med.model.loading import load_pretrained

LINE_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return load_pretrained(str(tiny_model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def questions(easy_vqa_dir) -> list[dict]:
    return json.loads((easy_vqa_dir / "test.json").read_text())[:10]


def _question_file(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(records))
    return path


def _cli(tiny_model_dir, easy_vqa_dir, qfile, answers, *extra) -> int:
    return main([
        "--model", str(tiny_model_dir), "--question-file", str(qfile), "--image-folder", str(easy_vqa_dir / "images"),
        "--answers-file", str(answers), "--max-new-tokens", "3", "--batch-size", "4", "--quiet", *extra,
    ])


def build_prompt(record: dict, template: str, num_image_tokens: int, start_end: bool) -> str:
    """The LLaVA back end's prompt of a VQA record, for a model of `num_image_tokens` image tokens."""
    model = argparse.Namespace(num_image_tokens=num_image_tokens,
                               config=argparse.Namespace(mm_use_im_start_end=start_end))
    backend = LlavaBackend(model, None, None, get_template(template))
    return backend.render([("human", question_text(record))], "image" in record)


def test_prompt_is_the_reference_simple_eval_prompt():
    record = {"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "What color?\n<image>"}]}
    expected = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.###Human: Hi!###Assistant: Hi there!  How can I "
        "help you today?\n###Human: What color?\n<im_start><im_patch><im_patch><im_end>###"
    )
    assert build_prompt(record, "simple", 2, True) == expected
    assert build_prompt(record, "simple", 2, False).endswith("What color?\n<im_patch><im_patch>###")
    assert display_prompt(record) == "What color?\n<image>"
    text_only = {"id": 2, "conversations": [{"from": "human", "value": "<image>Why?"}]}
    assert build_prompt(text_only, "simple", 2, True).endswith("###Human: Why?###")


def test_left_pad_and_stop_criterion(tiny):
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    tokenizer = tiny[1]
    rows = [
        tokenizer("yes###", add_special_tokens=False)["input_ids"],
        tokenizer("a red one", add_special_tokens=False)["input_ids"],
    ]
    ids, _ = left_pad(rows, tokenizer.pad_token_id)
    assert StopOnString(tokenizer, "###")(ids, None).tolist() == [True, False]


def test_batched_generation_matches_one_by_one(tiny, questions, easy_vqa_dir):
    model, tokenizer, processor = tiny
    kwargs = {"conv_mode": "simple", "max_new_tokens": 6, "image_folder": easy_vqa_dir / "images"}
    single = generate_answers(model, tokenizer, processor, questions, 1, **kwargs)
    assert sorted(single) == sorted(str(q["id"]) for q in questions)
    assert any(single.values()), "the tiny model should generate some text"
    for batch_size in (4, 16):
        assert generate_answers(model, tokenizer, processor, questions, batch_size, **kwargs) == single


def test_generate_vqa_writes_reference_answer_lines(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    answers = tmp_path / "answers.jsonl"
    assert _cli(tiny_model_dir, easy_vqa_dir, _question_file(tmp_path, questions), answers) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [set(r) for r in rows] == [LINE_KEYS] * len(questions)
    assert sorted(r["question_id"] for r in rows) == sorted(q["id"] for q in questions)
    by_id = {q["id"]: q for q in questions}
    assert all(r["prompt"] == display_prompt(by_id[r["question_id"]]) for r in rows)
    assert all(r["model_id"] == tiny_model_dir.name for r in rows)
    expected = {"model": str(Path(tiny_model_dir).resolve()), "conv_mode": "simple", "max_new_tokens": 3,
                "temperature": 0.0, "strip_role_prefix": False, "image_aspect_ratio": "square", "dtype": "auto",
                "seed": 0, "weights": weights_fingerprint(tiny_model_dir)}
    assert all(r["metadata"] == {"generation": expected} for r in rows)
    assert len({r["answer_id"] for r in rows}) == len(rows)


def test_resume_with_other_settings_refuses_then_restart_replaces(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    from exgra_med.cli import run_command
    from exgra_med.errors import UserError

    qfile, answers = _question_file(tmp_path, questions[:4]), tmp_path / "answers.jsonl"
    assert _cli(tiny_model_dir, easy_vqa_dir, qfile, answers) == 0
    before = answers.read_text()
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other_model)  # same weights, another model folder
    for extra, differs in [(("--max-new-tokens", "4"), "max_new_tokens: 3 there, 4 now"),
                           (("--conv-mode", "llava_med"), "conv_mode: 'simple' there, 'llava_med' now"),
                           (("--temperature", "0.7"), "temperature: 0.0 there, 0.7 now")]:
        with pytest.raises(UserError, match=differs):
            _cli(tiny_model_dir, easy_vqa_dir, qfile, answers, *extra)
    with pytest.raises(UserError, match="model: .* there, .*other-model' now"):
        main(["--model", str(other_model), "--question-file", str(qfile), "--answers-file", str(answers),
              "--image-folder", str(easy_vqa_dir / "images"), "--max-new-tokens", "3", "--quiet"])
    assert answers.read_text() == before  # nothing was appended
    # Through the CLI the refusal is one line and exit code 2.
    argv = ["--model", str(tiny_model_dir), "--question-file", str(qfile), "--answers-file", str(answers),
            "--max-new-tokens", "5", "--quiet"]
    assert run_command(main, argv, "exgra-med generate-vqa") == 2
    # --restart replaces the file with the new model's answers.
    assert _cli(tiny_model_dir, easy_vqa_dir, qfile, answers, "--max-new-tokens", "4", "--restart") == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 4 and {r["metadata"]["generation"]["max_new_tokens"] for r in rows} == {4}
    # A file without provenance (older version) is refused too.
    answers.write_text(json.dumps({"question_id": questions[0]["id"], "text": "x", "metadata": {}}) + "\n")
    with pytest.raises(UserError, match="does not record the model"):
        _cli(tiny_model_dir, easy_vqa_dir, qfile, answers)


def test_settings_default_to_the_recorded_training_settings(tiny_model_dir, tmp_path, caplog):
    from exgra_med.eval.generate import resolve_settings
    from exgra_med.io import read_json, write_json_atomic
    from exgra_med.model.options import ModelOptions

    def resolved(template=None, aspect=None) -> tuple[str, str]:
        options = resolve_settings(ModelOptions(str(model), conv_template=template, image_aspect_ratio=aspect))
        return options.conv_template, options.image_aspect_ratio

    model = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors", "llm", "vision"))
    assert resolved() == ("simple", "square")  # nothing recorded: the reference's eval prompt and preprocessing
    config = {**read_json(model / "config.json"), "conv_template": "llava_med", "image_aspect_ratio": "pad"}
    write_json_atomic(model / "config.json", config)
    assert resolved() == ("llava_med", "pad")
    caplog.clear()
    assert resolved("simple", "square") == ("simple", "square")  # an explicit flag wins, with a warning
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("image_aspect_ratio=pad" in w and "image_aspect_ratio=square" in w for w in warned), warned


def test_resume_skips_answered_ids_and_drops_a_torn_line(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    answers = tmp_path / "answers.jsonl"
    generation = {"model": str(Path(tiny_model_dir).resolve()), "conv_mode": "simple", "max_new_tokens": 3,
                  "temperature": 0.0, "strip_role_prefix": False, "image_aspect_ratio": "square", "dtype": "auto",
                "seed": 0}
    kept = [
        {"question_id": q["id"], "prompt": "p", "text": "PREVIOUS", "answer_id": "x", "model_id": "m",
         "metadata": {"generation": generation}}
        for q in questions[:3]
    ]
    torn = json.dumps({"question_id": questions[3]["id"], "text": "half"})[:25]
    answers.write_text("".join(json.dumps(r) + "\n" for r in kept) + torn)
    assert [r["question_id"] for r in read_answer_lines(answers)] == [q["id"] for q in questions[:3]]

    assert _cli(tiny_model_dir, easy_vqa_dir, _question_file(tmp_path, questions), answers) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]  # every line is valid JSON again
    ids = [r["question_id"] for r in rows]
    assert sorted(ids) == sorted(q["id"] for q in questions) and len(ids) == len(set(ids))
    assert rows[:3] == kept
    assert all(r["text"] != "PREVIOUS" for r in rows[3:])
    size = answers.stat().st_size
    assert _cli(tiny_model_dir, easy_vqa_dir, _question_file(tmp_path, questions), answers) == 0  # nothing left to do
    assert answers.stat().st_size == size


def test_read_answer_lines_rejects_a_bad_line_in_the_middle(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 1}\nnot json\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_answer_lines(path)


def test_an_answers_file_that_is_an_input_or_not_an_answers_file_is_never_changed(
        tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    from exgra_med.errors import UserError
    from exgra_med.eval.launch import NotAnswersFileError

    qfile = _question_file(tmp_path, questions[:2])  # json.dumps: no final newline, like every json.dump file
    before = qfile.read_bytes()
    with pytest.raises(UserError, match="is the --question-file file"):
        _cli(tiny_model_dir, easy_vqa_dir, qfile, qfile)
    other = tmp_path / "notes.json"
    other.write_bytes(before)  # another file of the same kind given as the answers file by mistake
    for extra in ((), ("--restart",)):
        with pytest.raises(NotAnswersFileError, match="not an answers file, left unchanged"):
            _cli(tiny_model_dir, easy_vqa_dir, qfile, other, *extra)
    assert qfile.read_bytes() == before and other.read_bytes() == before


def test_answers_of_a_model_retrained_into_the_same_folder_are_not_mixed(
        tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    from safetensors.torch import load_file, save_file

    from exgra_med.errors import UserError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    answers = tmp_path / "answers.jsonl"
    assert _cli(model, easy_vqa_dir, _question_file(tmp_path, questions[:2]), answers) == 0
    fingerprint = json.loads(answers.read_text().splitlines()[0])["metadata"]["generation"]["weights"]
    assert fingerprint.startswith("blake2b:")
    state = load_file(model / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, model / "model.safetensors",
              metadata={"format": "pt"})  # "retrained": same names, shapes and header size, other values
    before = answers.read_bytes()
    with pytest.raises(UserError, match="the model's weights changed since they were written"):
        _cli(model, easy_vqa_dir, _question_file(tmp_path, questions[:4]), answers)
    assert answers.read_bytes() == before


def test_chunks_merge_back_into_question_order(tiny_model_dir, easy_vqa_dir, questions, tmp_path):
    assert [len(get_chunk(list(range(10)), 3, i)) for i in range(3)] == [4, 4, 2]
    assert get_chunk(list(range(10)), 3, 2) == [8, 9]
    qfile = _question_file(tmp_path, questions)
    final = tmp_path / "answers.jsonl"
    files = [chunk_path(final, 3, i) for i in range(3)]
    for i in range(3):
        assert _cli(tiny_model_dir, easy_vqa_dir, qfile, files[i], "--num-chunks", "3", "--chunk-idx", str(i)) == 0
    assert merge_answers(qfile, files, final) == len(questions)
    assert [json.loads(line)["question_id"] for line in final.read_text().splitlines()] == [q["id"] for q in questions]

    lines = files[1].read_text().splitlines()
    files[1].write_text("\n".join(lines[1:]) + "\n")  # one answer lost
    with pytest.raises(ValueError, match="1 questions without an answer"):
        merge_answers(qfile, files, tmp_path / "other.jsonl")
    files[1].write_text("\n".join(lines + lines[:1]) + "\n")  # one answer twice
    with pytest.raises(ValueError, match="1 answered twice"):
        merge_answers(qfile, files, tmp_path / "other.jsonl")
    rows = [json.loads(line) for line in lines]
    rows[0]["metadata"]["generation"]["model"] = "another"
    files[1].write_text("".join(json.dumps(r) + "\n" for r in rows))  # one chunk from another model
    with pytest.raises(ValueError, match="2 different models or settings"):
        merge_answers(qfile, files, tmp_path / "other.jsonl")


def test_chunk_commands_spread_chunks_over_gpus_round_robin(tmp_path):
    workers = chunk_commands(5, tmp_path / "a.jsonl", ["--model", "m"], ["3", "7"])
    assert [env for env, _ in workers] == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "7"}]
    chunk_ids = [[cmd[cmd.index("--chunk-idx") + 1] for cmd in cmds] for _, cmds in workers]
    assert chunk_ids == [["0", "2", "4"], ["1", "3"]]
    assert workers[0][1][1][-1] == str(chunk_path(tmp_path / "a.jsonl", 5, 2))
    cpu = chunk_commands(2, tmp_path / "a.jsonl", [], [])
    assert len(cpu) == 2 and all(env["CUDA_VISIBLE_DEVICES"] == "" for env, _ in cpu)


@pytest.mark.slow  # two subprocesses that each import torch and load the model
def test_launcher_runs_chunks_as_processes_and_merges(tiny_model_dir, easy_vqa_dir, questions, tmp_path, monkeypatch):
    from exgra_med.eval import launch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU path: one process per chunk
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qfile, final = _question_file(tmp_path, questions[:5]), tmp_path / "merged.jsonl"
    argv = [
        "--num-chunks",
        "2",
        "--question-file",
        str(qfile),
        "--answers-file",
        str(final),
        "--model",
        str(tiny_model_dir),
        "--image-folder",
        str(easy_vqa_dir / "images"),
        "--max-new-tokens",
        "2",
    ]
    assert launch.main(argv) == 0
    rows = [json.loads(line) for line in final.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["id"] for q in questions[:5]]
    assert [len(read_answer_lines(chunk_path(final, 2, i))) for i in range(2)] == [3, 2]


def _refused_before_loading(monkeypatch, capsys, argv: list[str]) -> str:
    """Run `argv` through the CLI with model loading forbidden; returns its one stderr line (exit code 2)."""
    from exgra_med.cli import main as cli_main
    from exgra_med.eval import generate

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(generate, "load_backend", no_loading)
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("records, expected", [
    ([1, 2], "record #0 is a number, not an object (a question record)"),
    (["What?"], "record #0 is a string, not an object (a question record)"),
    ([{"id": 7, "image": None, "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}],
     "record #0 (id 7): 'image' is null; give an image file name, or leave 'image' out for a question without one"),
    ([{"id": 7, "image": ["a.png"], "conversations": [{"from": "human", "value": "What?"}]}],
     "record #0 (id 7): 'image' is a list; give an image file name"),
])
def test_question_records_of_the_wrong_shape_are_refused_in_one_line_before_the_model_loads(
        tiny_model_dir, tmp_path, monkeypatch, capsys, records, expected):
    questions = _question_file(tmp_path, records)
    line = _refused_before_loading(monkeypatch, capsys, [
        "generate-vqa", "--model", str(tiny_model_dir), "--question-file", str(questions),
        "--answers-file", str(tmp_path / "a.jsonl")])
    assert line == f"exgra-med generate-vqa: error: {questions}: {expected}"


def test_an_answers_file_in_a_missing_folder_is_refused_before_the_model_loads(
        tiny_model_dir, questions, tmp_path, monkeypatch, capsys):
    answers = tmp_path / "no_such_dir" / "a.jsonl"
    line = _refused_before_loading(monkeypatch, capsys, [
        "generate-vqa", "--model", str(tiny_model_dir), "--question-file", str(_question_file(tmp_path, questions)),
        "--answers-file", str(answers)])
    assert line == (f"exgra-med generate-vqa: error: --answers-file {answers}: the folder {answers.parent} does not "
                    "exist; create it first")
    assert not answers.parent.exists()


@pytest.mark.parametrize("command", ["generate-vqa", "grounding-audit"])
def test_batch_size_is_checked_when_the_flags_are_parsed(tiny_model_dir, questions, tmp_path, monkeypatch, capsys,
                                                         command):
    from exgra_med.cli import main as cli_main
    from exgra_med.eval import generate

    monkeypatch.setattr(generate, "load_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = [command, "--model", str(tiny_model_dir), "--question-file", str(_question_file(tmp_path, questions)),
            "--batch-size", "0"]
    argv += ["--answers-file", str(tmp_path / "a.jsonl")] if command == "generate-vqa" else ["--candidate", "c.json"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("argument --batch-size: must be an integer >= 1, got '0'")
