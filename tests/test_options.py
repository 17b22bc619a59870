"""One declaration of the model and decoding flags (`exgra_med.model.options`) for every command that loads a model:
the same names, help, defaults and choices on generate-vqa, zero-shot, grounding-audit, chat, web and serve-api (and
export-hf for the flags it shares); `--conv-mode` a hidden alias of `--conv-template`; `--device auto --dtype auto`
LoadOptions' defaults; quantised loading on a CPU one line on every command."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import fields

import pytest
import torch

from exgra_med.cli import run_command
from exgra_med.errors import UserError
from exgra_med.eval import generate, grounding, zero_shot
from exgra_med.model import export_cli
from exgra_med.model.auto import LoadOptions, load_backend
from exgra_med.model.options import DecodingOptions, ModelOptions
from exgra_med.serve import api, chat, web

# command -> (module, the arguments its other required flags need, its (max_new_tokens, temperature) defaults)
INFERENCE = {
    "generate-vqa": (generate, ["--question-file", "q", "--answers-file", "a"], (1024, 0.0)),
    "zero-shot": (zero_shot, ["--question-file", "q", "--out", "o"], (256, 0.7)),
    "grounding-audit": (grounding, ["--question-file", "q", "--candidate", "c"], (1024, 0.0)),
    "chat": (chat, [], (256, 0.0)),
    "web": (web, [], (256, 0.0)),
    "serve-api": (api, [], (256, 0.0)),
}
MODEL_FLAGS = ["--model", "--vision-tower", "--conv-template", "--conv-mode", "--load-4bit", "--load-8bit",
               "--device", "--dtype", "--attn-implementation", "--image-aspect-ratio"]
DECODING_FLAGS = ["--max-new-tokens", "--temperature", "--top-p", "--seed"]
EXPORT_FLAGS = ["--vision-tower", "--dtype", "--image-aspect-ratio"]
PER_COMMAND_DEFAULTS = {"--max-new-tokens", "--temperature"}


def _parser(name: str) -> argparse.ArgumentParser:
    return export_cli.build_parser() if name == "export-hf" else INFERENCE[name][0].build_parser()


def _flag(parser: argparse.ArgumentParser, option: str) -> dict:
    """Everything a declaration of `option` says; the parser's own default where the action has none."""
    action = parser._option_string_actions[option]
    default = action.default if action.default is not argparse.SUPPRESS else parser.get_default(action.dest)
    return {"action": type(action).__name__, "options": tuple(action.option_strings), "dest": action.dest,
            "default": default, "const": action.const, "choices": action.choices, "type": action.type,
            "required": action.required, "help": action.help, "nargs": action.nargs}


def _parse(name: str, *argv: str) -> argparse.Namespace:
    module, required, _ = INFERENCE[name]
    return module.build_parser().parse_args(["--model", "m", *required, *argv])


def test_every_inference_command_declares_the_shared_flags_alike():
    reference = _parser("generate-vqa")
    for name, (_, _, (max_new_tokens, temperature)) in INFERENCE.items():
        parser = _parser(name)
        for option in MODEL_FLAGS + DECODING_FLAGS:
            assert option in parser._option_string_actions, (name, option)
            mine, theirs = _flag(parser, option), _flag(reference, option)
            if option in PER_COMMAND_DEFAULTS:
                mine.pop("default"), theirs.pop("default")
            assert mine == theirs, (name, option)
        args = _parse(name)
        assert (args.max_new_tokens, args.temperature) == (max_new_tokens, temperature), name
        assert (args.top_p, args.seed, args.bits, args.device, args.dtype) == (1.0, 0, 16, "auto", "auto"), name
        assert (args.conv_template, args.image_aspect_ratio, args.vision_tower) == (None, None, None), name
        assert args.attn_implementation == "sdpa"
        # The same groups read them back.
        assert ModelOptions.from_args(args) == ModelOptions("m")
        assert DecodingOptions.from_args(args) == DecodingOptions(max_new_tokens, temperature)


def test_export_hf_shares_the_flags_it_takes():
    parser, reference = _parser("export-hf"), _parser("chat")
    for option in EXPORT_FLAGS:
        assert _flag(parser, option) == _flag(reference, option), option
    assert not {"--model", "--load-4bit", "--device", "--max-new-tokens"} & set(parser._option_string_actions)
    args = parser.parse_args(["--in", "src", "--out", "o"])
    options = ModelOptions.from_args(args, model=args.src)
    assert options == ModelOptions("src") and options.torch_dtype is None  # auto: the checkpoint's own dtype
    assert ModelOptions.from_args(parser.parse_args(["--in", "s", "--out", "o", "--dtype", "float16"]),
                                  model="s").torch_dtype is torch.float16


@pytest.mark.parametrize("name", [*INFERENCE])
def test_conv_mode_is_a_hidden_alias_of_conv_template(name):
    assert _parse(name, "--conv-mode", "mistral").conv_template == "mistral"
    assert _parse(name, "--conv-template", "mistral").conv_template == "mistral"
    assert _parse(name, "--conv-mode", "simple") == _parse(name, "--conv-template", "simple")
    text = _parser(name).format_help()
    assert "--conv-template" in text and "--conv-mode" not in text
    with pytest.raises(SystemExit):  # the alias checks its choices too
        _parse(name, "--conv-mode", "nope")


def test_bits_flags_and_their_exclusion():
    assert _parse("chat", "--load-4bit").bits == 4 and _parse("generate-vqa", "--load-8bit").bits == 8
    with pytest.raises(SystemExit):
        _parse("zero-shot", "--load-4bit", "--load-8bit")
    assert "(default: 16)" not in " ".join(_parser("serve-api").format_help().split())


def test_device_and_dtype_auto_are_the_load_options_defaults(tiny_model_dir, monkeypatch):
    options = ModelOptions.from_args(_parse("grounding-audit", "--device", "auto", "--dtype", "auto"))
    loading = options.load_options()
    assert loading == LoadOptions(bits=16)
    assert (loading.device, loading.dtype) == (LoadOptions().device, LoadOptions().dtype) == (None, None)
    explicit = ModelOptions.from_args(_parse("web", "--device", "cpu", "--dtype", "bfloat16", "--load-8bit"))
    assert explicit.load_options() == LoadOptions(device="cpu", dtype=torch.bfloat16, bits=8)
    # On a machine without a GPU, auto loads on the CPU in float32.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = load_backend(str(tiny_model_dir), ModelOptions(str(tiny_model_dir)).load_options()).model
    parameter = next(model.parameters())
    assert (parameter.device.type, parameter.dtype) == ("cpu", torch.float32)


def test_bad_values_name_their_flag():
    for make, flag in [(lambda: ModelOptions("m", device="gpu0"), "--device"),
                       (lambda: ModelOptions("m", dtype="half"), "--dtype"),
                       (lambda: ModelOptions("m", bits=2), "--load-4bit"),
                       (lambda: ModelOptions("m", conv_template="nope"), "--conv-template"),
                       (lambda: DecodingOptions(max_new_tokens=0), "--max-new-tokens"),
                       (lambda: DecodingOptions(temperature=-1.0), "--temperature"),
                       (lambda: DecodingOptions(top_p=0.0), "--top-p")]:
        with pytest.raises(UserError, match=re.escape(flag)):
            make()
    with pytest.raises(UserError, match="--top-p"):
        DecodingOptions.from_args(_parse("serve-api", "--top-p", "1.5"))
    assert {f.name for f in fields(DecodingOptions)} == {"max_new_tokens", "temperature", "top_p", "seed"}


def _vqa_files(tmp_path, easy_vqa_dir, n=3):
    questions = json.loads((easy_vqa_dir / "test.json").read_text())[:n]
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps(questions))
    return qfile, questions


def test_the_references_command_line_still_runs(tiny_model_dir, easy_vqa_dir, tmp_path):
    qfile, questions = _vqa_files(tmp_path, easy_vqa_dir)
    common = ["--model", str(tiny_model_dir), "--question-file", str(qfile), "--image-folder",
              str(easy_vqa_dir / "images"), "--max-new-tokens", "3", "--quiet"]
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    assert generate.main([*common, "--answers-file", str(old), "--conv-mode", "simple"]) == 0
    assert generate.main([*common, "--answers-file", str(new), "--conv-template", "simple"]) == 0
    old_rows = [json.loads(line) for line in old.read_text().splitlines()]
    new_rows = [json.loads(line) for line in new.read_text().splitlines()]
    assert len(old_rows) == len(questions)
    assert [(r["question_id"], r["text"], r["metadata"]) for r in old_rows] == \
           [(r["question_id"], r["text"], r["metadata"]) for r in new_rows]
    assert old_rows[0]["metadata"]["generation"]["conv_mode"] == "simple"  # the answers file's key is unchanged


def test_an_answers_file_of_the_previous_version_resumes(tiny_model_dir, easy_vqa_dir, tmp_path):
    qfile, questions = _vqa_files(tmp_path, easy_vqa_dir)
    # What the previous version recorded (every flag of add_model_args but the placement ones), verbatim.
    previous = {"model": str(tiny_model_dir.resolve()), "conv_mode": "simple", "max_new_tokens": 3,
                "temperature": 0.0, "strip_role_prefix": False, "image_aspect_ratio": "square", "dtype": "auto",
                "seed": 0}
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": questions[0]["id"], "prompt": "p", "text": "PREVIOUS",
                                   "answer_id": "x", "model_id": "m", "metadata": {"generation": previous}}) + "\n")
    argv = ["--model", str(tiny_model_dir), "--question-file", str(qfile), "--answers-file", str(answers),
            "--image-folder", str(easy_vqa_dir / "images"), "--max-new-tokens", "3", "--quiet"]
    assert generate.main(argv) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == len(questions) and rows[0]["text"] == "PREVIOUS"
    # The new lines record the same settings, and the weights' fingerprint the previous version did not have.
    assert all({k: v for k, v in r["metadata"]["generation"].items() if k != "weights"} == previous for r in rows)
    assert all(r["metadata"]["generation"]["weights"].startswith("blake2b:") for r in rows[1:])
    # A new setting is recorded once it changes the answers, and then refuses the old file.
    with pytest.raises(UserError, match=r"top_p: None there, 0\.9 now"):
        generate.main([*argv, "--temperature", "0", "--top-p", "0.9"])


def _quantised_argv(name, tiny_model_dir, easy_vqa_dir, tmp_path) -> list[str]:
    qfile, _ = _vqa_files(tmp_path, easy_vqa_dir)
    required = {
        "generate-vqa": ["--question-file", str(qfile), "--answers-file", str(tmp_path / "a.jsonl")],
        "zero-shot": ["--question-file", str(qfile), "--out", str(tmp_path / "zs")],
        "grounding-audit": ["--question-file", str(qfile), "--candidate", str(easy_vqa_dir / "candidate.json")],
        "serve-api": ["--port", "0"],
    }.get(name, [])
    return ["--model", str(tiny_model_dir), *required, "--load-4bit"]


@pytest.mark.parametrize("name", [*INFERENCE])
def test_quantised_loading_on_a_cpu_is_one_line(name, tiny_model_dir, easy_vqa_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _quantised_argv(name, tiny_model_dir, easy_vqa_dir, tmp_path)
    assert run_command(INFERENCE[name][0].main, argv, f"exgra-med {name}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"exgra-med {name}: .*--load-4bit needs a CUDA GPU", err[0]), err


def test_export_hf_exports_the_recorded_preprocessing(tiny_model_dir, tmp_path):
    model = tmp_path / "trained-with-pad"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "pad"}))
    for flags, padded in [([], True), (["--image-aspect-ratio", "square"], False)]:  # a flag that disagrees wins
        out = tmp_path / f"hf{len(flags)}"
        assert export_cli.main(["--in", str(model), "--out", str(out), *flags]) == 0
        processor = json.loads((out / "processor_config.json").read_text())
        image_processor = processor.get("image_processor", processor)
        assert image_processor["do_pad"] is padded, processor
