"""`exgra-med train` on native VLMs, per architecture: stage 2 with the alignment on easy-VQA, the output as a plain
checkpoint of the base architecture (Auto classes, no project code), records with two images, LoRA, flag checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from exgra_med.model.native.aligned import ALIGNMENT_CONFIG, ALIGNMENT_WEIGHTS
from tests.vlm.runs import STAGE2_STEPS, log_history, train_args

# Loads a trained folder and answers a chat-templated question about an image with transformers alone.
LOAD_AND_GENERATE = r"""
import json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, image = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], images=[[Image.open(image).convert("RGB")]], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
print(json.dumps({"model_type": model.config.model_type, "prompt": inputs["input_ids"][0].tolist(),
                  "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
                  "new": out[0, inputs["input_ids"].shape[1]:].tolist(),
                  "project_code": sorted(m for m in sys.modules if m.startswith("exgra_med"))}))
"""


def _auto_generate(folder: Path, image: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(folder), str(image)], capture_output=True,
                          text=True, env=dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_stage2_with_alignment_logs_finite_losses_and_saves_the_base_format(arch, stage2_run, tiny_vlm,
                                                                             easy_vqa_dir):
    out = stage2_run(arch)
    steps = [h for h in log_history(out) if "lm_loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STAGE2_STEPS + 1))
    for h in steps:
        assert math.isfinite(h["lm_loss"]) and math.isfinite(h["align_loss"]) and 0 <= h["align_loss"] <= 2
        assert h["loss"] == pytest.approx(h["lm_loss"] + h["align_loss"], abs=2e-3)  # alpha 1
        assert {"align_loss/image", "align_loss/response", "align_loss/extended"} <= set(h)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and "alignment_config" not in config  # the model's own config, unchanged
    head = json.loads((out / ALIGNMENT_CONFIG).read_text())
    assert head["alignment_config"]["multi_graph"] and head["hidden_size"] == 64
    assert (out / ALIGNMENT_WEIGHTS).is_file()

    trained = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    initial = AutoModelForImageTextToText.from_pretrained(tiny_vlm(arch)).state_dict()
    assert set(trained) == set(initial)
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert any("language_model.layers.0" in k for k in changed)  # the LLM trained
    assert any("multi_modal_projector" in k or "merger" in k for k in changed)  # and the projector
    vision = {k for k in trained if ("vision_tower" in k or "visual" in k) and "merger" not in k}
    assert vision and not vision & changed  # the vision encoder stayed frozen

    # Plain transformers loads it and answers a chat-templated question about an image ...
    image = easy_vqa_dir / "images" / sorted(os.listdir(easy_vqa_dir / "images"))[0]
    plain = _auto_generate(out, image)
    assert plain["model_type"] == arch and plain["project_code"] == [] and plain["image_tokens"] > 0
    assert 1 <= len(plain["new"]) <= 6
    # ... exactly as this project's inference does.
    from exgra_med.model.auto import LoadOptions, load_backend

    native = load_backend(str(out), LoadOptions(device="cpu"))
    prompt = native.encode_conversation([("human", "<image>What color is the shape?")], Image.open(image))
    assert prompt.input_ids == plain["prompt"]
    assert native.generate([prompt], **native.generate_kwargs(6))[0].tolist()[: len(plain["new"])] == plain["new"]


def _two_image_records(easy_vqa_dir: Path, out: Path) -> Path:
    records = json.loads((easy_vqa_dir / "instruct.json").read_text())[:8]
    others = [r["image"] for r in records[1:] + records[:1]]
    for record, other in zip(records, others):
        record["image"] = [record["image"], other]  # e.g. two views of one study
        for key in ("conversations", "conversations_long"):
            first = record[key][0]
            first["value"] = "<image>\n<image>\n" + first["value"].replace("<image>", "").strip()
    out.write_text(json.dumps(records))
    return out


def test_records_with_two_images_train(arch, tiny_vlm, easy_vqa_dir, tmp_path):
    from exgra_med.data.chat import ChatEncoder, NativeCollator, NativeDataset, stop_strings
    from exgra_med.train.main import main

    data = _two_image_records(easy_vqa_dir, tmp_path / "two_views.json")
    processor = AutoProcessor.from_pretrained(tiny_vlm(arch))
    dataset = NativeDataset(data, easy_vqa_dir / "images", ChatEncoder(processor, stop_strings(processor)),
                            alignment=True)
    batch = NativeCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["images_per_sample"] == [2, 2]
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm(arch))
    inputs = {k: v for k, v in batch.items() if k not in ("ids", "images_per_sample") and "response" not in k
              and "extended" not in k}
    assert len(model(**inputs).image_outputs.pooler_output) == 4  # two images per sample reach the model

    out = tmp_path / "out"
    assert main(train_args(tiny_vlm(arch), data, easy_vqa_dir / "images", out, 2)) == 0
    steps = [h for h in log_history(out) if "lm_loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(math.isfinite(h["lm_loss"]) and math.isfinite(h["align_loss"]) for h in steps)


def test_lora_folds_into_a_plain_checkpoint_and_training_continues_from_it(tiny_vlm, easy_vqa_dir, tmp_path):
    from exgra_med.train.main import main

    folder = tiny_vlm("llava_onevision")
    lora = tmp_path / "lora"
    extra = ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--activation_checkpointing", "True"]
    assert main(train_args(folder, easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", lora, 2, *extra)) == 0
    weights = AutoModelForImageTextToText.from_pretrained(lora).state_dict()
    initial = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    assert set(weights) == set(initial)  # no lora_A / base_layer names left
    key = next(k for k in weights if "language_model.layers.0.self_attn.q_proj.weight" in k)
    assert not torch.equal(weights[key], initial[key])  # the adapters were folded in
    assert not torch.equal(weights["model.image_newline"], initial["model.image_newline"])  # projector trained fully
    emb = next(k for k in weights if k.endswith("embed_tokens.weight"))
    assert torch.equal(weights[emb], initial[emb])  # LoRA leaves the rest of the LLM alone

    # Loading the merged folder into a LoRA-wrapped model (the best checkpoint at the end of a LoRA run): base layers
    # take the merged weights, adapters are zeroed, so the model computes what the saved one does.
    from exgra_med.align.config import AlignmentConfig
    from exgra_med.model.native.aligned import AlignedVLM
    from exgra_med.model.native.training import load_native_weights, set_native_trainable
    from exgra_med.train.args import ModelArguments

    wrapped = AlignedVLM(AutoModelForImageTextToText.from_pretrained(folder), AlignmentConfig())
    set_native_trainable(wrapped, ModelArguments(model_name_or_path=str(folder), lora_enable=True, lora_r=4))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_()
    load_native_weights(wrapped, lora)
    merged = {k.replace(".base_layer.", "."): v for k, v in wrapped.base_vlm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(merged[k], weights[k]) for k in weights)
    assert all(not p.any() for n, p in wrapped.named_parameters() if "lora_B" in n)

    # Fine-tuning from the stage-2 output (alignment off, the saved head ignored): plain LM training.
    finetune = tmp_path / "finetune"
    assert main(train_args(lora, easy_vqa_dir / "train.json", easy_vqa_dir / "images", finetune, 1,
                           alignment=False)) == 0
    steps = [h for h in log_history(finetune) if "lm_loss" in h]
    assert steps and "align_loss" not in steps[0] and not (finetune / ALIGNMENT_WEIGHTS).exists()


def test_llava_only_flags_are_refused_in_one_line(tiny_vlm, easy_vqa_dir, tmp_path, capsys):
    from exgra_med.cli import main as cli

    base = train_args(tiny_vlm("qwen2_5_vl"), easy_vqa_dir / "instruct.json", easy_vqa_dir / "images",
                      tmp_path / "out", 1)
    assert cli(["train", *base, "--vision_tower", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("exgra-med train: error: --vision_tower") and "transformers-native VLM" in err
    assert cli(["train", *base, "--simi_type", "OT", "--multi_graph", "False"]) == 2
    assert "--simi_type OT" in capsys.readouterr().err


def test_fine_tuning_scores_val_keeps_the_best_checkpoint_and_scores_test(tiny_vlm, easy_vqa_dir, tmp_path):
    """In-training VQA scoring through the model's chat template; --load_best_model_at_end restores the best
    checkpoint's native weights; the test answers are what the saved model answers."""
    from exgra_med.eval.generate import generate_answers
    from exgra_med.model.auto import LoadOptions, load_backend
    from exgra_med.train.main import main

    records = {name: json.loads((easy_vqa_dir / f"{name}.json").read_text())[:6] for name in ("val", "test")}
    for name, rows in records.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    out = tmp_path / "ft"
    argv = train_args(tiny_vlm("qwen2_5_vl"), easy_vqa_dir / "train.json", easy_vqa_dir / "images", out, 4,
                      "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
                      "--load_best_model_at_end", "True", "--metric_for_best_model", "eval_val_average",
                      "--evaluate_on_val", "True", "--val_data_path", str(tmp_path / "val.json"),
                      "--evaluate_on_test", "True", "--test_data_path", str(tmp_path / "test.json"),
                      "--eval_max_new_tokens", "4", "--eval_batch_size", "4", "--learning_rate", "3e-3",
                      alignment=False)
    assert main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_val_average" in h]
    assert [h["step"] for h in evals] == [2, 4]
    best = state["best_model_checkpoint"]
    assert best.endswith("checkpoint-4" if evals[1]["eval_val_average"] > evals[0]["eval_val_average"]
                         else "checkpoint-2")
    final, kept = _load_weights(out), _load_weights(Path(best))
    assert all(torch.equal(final[k], kept[k]) for k in final)  # the saved model is the best checkpoint
    step2, step4 = _load_weights(out / "checkpoint-2"), _load_weights(out / "checkpoint-4")
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)  # so which one was kept matters
    lines = [json.loads(x) for x in (out / "test_answers.jsonl").read_text().splitlines()]
    native = load_backend(str(out), LoadOptions(device="cpu"))
    again = generate_answers(native, native.processor, None, records["test"], 1, max_new_tokens=4,
                             image_folder=easy_vqa_dir / "images")
    assert [x["text"] for x in lines] == [again[str(r["id"])] for r in records["test"]]
    assert json.loads((out / "test_results.json").read_text())["eval_test_average"] >= 0


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_a_resumed_stage2_run_ends_with_the_weights_of_the_uninterrupted_run(tiny_vlm, easy_vqa_dir, tmp_path):
    import shutil

    from exgra_med.train.main import main

    model, data, images = tiny_vlm("gemma3"), easy_vqa_dir / "instruct.json", easy_vqa_dir / "images"
    full = tmp_path / "full"
    extra = ("--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "3")
    assert main(train_args(model, data, images, full, 4, *extra)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")  # a run killed after its step-2 checkpoint
    assert main(train_args(model, data, images, resumed, 4, *extra, "--resume_from_checkpoint", "auto")) == 0
    a, b = _load_weights(full), _load_weights(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    from safetensors.torch import load_file

    ha, hb = load_file(str(full / ALIGNMENT_WEIGHTS)), load_file(str(resumed / ALIGNMENT_WEIGHTS))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    losses = [[h["align_loss"] for h in log_history(run) if "align_loss" in h and h["step"] > 2]
              for run in (full, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2  # the same alignment noise after the resume


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "gemma3"])
def test_tune_vision_tower_trains_the_encoder_and_by_default_it_stays(arch, tiny_vlm, easy_vqa_dir, tmp_path):
    """`--tune_vision_tower True` on a native VLM: the vision encoder's weights change in a real run (the language model
    and projector train either way); without it they are saved as loaded."""
    from exgra_med.train.main import main

    folder = tiny_vlm(arch)
    initial = _load_weights(folder)
    encoder = [k for k in initial if ("visual." in k or "vision_tower." in k) and "merger" not in k]
    assert encoder
    for flag, out in (("True", tmp_path / "tuned"), ("False", tmp_path / "frozen")):
        assert main(train_args(folder, easy_vqa_dir / "train.json", easy_vqa_dir / "images", out, 2,
                               "--tune_vision_tower", flag, alignment=False)) == 0
        weights = _load_weights(out)
        changed = [k for k in encoder if not torch.equal(weights[k], initial[k])]
        if flag == "True":  # down to the patch embedding (SigLIP's pooling head, unused by Gemma 3, gets no gradient)
            assert any("patch_embed" in k for k in changed) and len(changed) >= len(encoder) // 2, changed
        else:
            assert not changed, changed


@pytest.mark.parametrize("extra, message", [
    (("--lora_enable", "True"), "--lora_enable"), (("--tune_mm_mlp_adapter", "True"), "--tune_mm_mlp_adapter")])
def test_tune_vision_tower_is_refused_where_the_run_trains_no_full_weights(extra, message):
    from exgra_med.train.args import ModelArguments

    with pytest.raises(ValueError, match=f"--tune_vision_tower .*{message}"):
        ModelArguments(model_name_or_path="x", tune_vision_tower=True, **{extra[0][2:]: True})
