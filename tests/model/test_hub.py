"""Hub ids wherever a path goes: resolution through a pre-populated local Hugging Face cache, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from exgra_med.model.checkpoint import load_model
from exgra_med.model.hub import (
    HubResolutionError,
    ignore_patterns,
    resolve_path,
    resolve_vision_tower,
    split_revision,
)
from exgra_med.model.vision import load_image_processor, load_vision_tower
from tests.conftest import publish_to_hub_cache


def _snapshot(cache, repo_id: str):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


def test_local_paths_are_returned_unchanged(tiny_model_dir):
    assert resolve_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_vision_tower("local-dir:/anything") == "local-dir:/anything"


def test_hub_ids_resolve_to_their_cached_snapshot(offline_hub, tmp_path):
    assert resolve_path("acme/tiny-exgra") == str(_snapshot(offline_hub, "acme/tiny-exgra"))
    assert resolve_vision_tower("hf-hub:acme/tiny-biomedclip") == (
        "local-dir:" + str(_snapshot(offline_hub, "acme/tiny-biomedclip")))
    assert split_revision("acme/x@v2") == ("acme/x", "v2")
    assert split_revision("acme/x") == ("acme/x", None)


def test_a_revision_picks_its_own_snapshot(offline_hub, tiny_model_dir):
    snap = publish_to_hub_cache(offline_hub, tiny_model_dir / "vision", "acme/tagged-clip", revision="v2")
    assert resolve_path("acme/tagged-clip@v2") == str(snap)
    with pytest.raises(HubResolutionError, match="acme/tagged-clip: no such local .* HF_HUB_OFFLINE=1"):
        resolve_path("acme/tagged-clip")  # main was never downloaded


def test_errors_name_the_id_and_the_reason(offline_hub, tmp_path):
    with pytest.raises(HubResolutionError, match=r"acme/unknown: no such local model folder; as a Hub id: "
                                                  r"HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache"):
        resolve_path("acme/unknown")
    with pytest.raises(HubResolutionError, match="no such local model file or folder"):
        resolve_path(str(tmp_path / "missing" / "deep" / "folder"))  # not a repo id either
    with pytest.raises(HubResolutionError, match=r"acme/tiny-llm: the Hub snapshot .* has no mm_projector"):
        resolve_path("acme/tiny-llm", "projector", require=("mm_projector.safetensors", "mm_projector.bin"))
    with pytest.raises(HubResolutionError, match="no open_clip_config.json"):
        resolve_vision_tower("hf-hub:acme/tiny-clip")


def test_ignore_patterns_skip_foreign_formats_and_pickle_twins():
    assert "pytorch_model*.bin" not in ignore_patterns(None)
    assert "*.msgpack" in ignore_patterns(None)
    with_twins = ignore_patterns(["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"])
    assert "pytorch_model*.bin" in with_twins and "open_clip_pytorch_model.bin" not in with_twins


def test_model_and_towers_load_from_hub_ids(offline_hub, tiny_model_dir):
    model, tokenizer, _ = load_model("acme/tiny-exgra", device="cpu")
    local, _, _ = load_model(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([tokenizer("What color is the shape?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, local(input_ids=ids).logits, rtol=0, atol=0)
    tower, cfg, kind = load_vision_tower("hf-hub:acme/tiny-biomedclip")
    assert kind == "open_clip" and tower.num_layers == len(tower.model.blocks) and "vision_cfg" in cfg
    assert load_image_processor("hf-hub:acme/tiny-biomedclip").crop_size == {"height": 64, "width": 64}
    tower, _, kind = load_vision_tower("acme/tiny-clip")
    assert kind == "hf" and tower.image_size == model.vision_tower.image_size


def test_generate_vqa_cli_from_a_hub_id(offline_hub, easy_vqa_dir, tmp_path, capsys):
    """The issue's reproduction: `exgra-med generate-vqa --model acme/tiny-exgra` with HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE, in a real subprocess, answers as the snapshot folder does (in process, the same `main`); an unknown
    id fails naming the id and the reason."""
    from exgra_med.cli import main

    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(json.loads((easy_vqa_dir / "test.json").read_text())[:4]))
    env = dict(os.environ, HF_HUB_CACHE=str(offline_hub), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "exgra_med.cli", "generate-vqa", "--question-file", str(questions),
            "--image-folder", str(easy_vqa_dir / "images"), "--max-new-tokens", "3", "--device", "cpu", "--quiet"]
    answers = tmp_path / "answers.jsonl"
    done = subprocess.run([*base, "--model", "acme/tiny-exgra", "--answers-file", str(answers)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    local = tmp_path / "local.jsonl"
    assert main([*base[3:], "--model", str(_snapshot(offline_hub, "acme/tiny-exgra")), "--answers-file",
                 str(local)]) == 0

    def texts(path):
        return {line["question_id"]: line["text"] for line in map(json.loads, path.read_text().splitlines())}

    assert set(texts(answers)) == {r["id"] for r in json.loads(questions.read_text())}
    assert texts(answers) == texts(local)
    capsys.readouterr()
    assert main([*base[3:], "--model", "acme/nope", "--answers-file", str(tmp_path / "other.jsonl")]) == 2
    assert "acme/nope: no such local model folder; as a Hub id: HF_HUB_OFFLINE=1" in capsys.readouterr().err
