"""Training from Hub ids (LLM, CLIP tower, BiomedCLIP via `hf-hub:`, stage-1 projector) in a local cache, offline."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from exgra_med.model.delimiters import delimiter_ids
from exgra_med.model.loading import load_pretrained
from exgra_med.train.main import main
from tests.conftest import publish_to_hub_cache

COMMON = [
    "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
    "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu", "True", "--save_strategy", "no",
]


def _stage1(llm: str, tower: str, data, out, steps: int = 2) -> list[str]:
    return ["--model_name_or_path", llm, "--vision_tower", tower, "--data_path", str(data / "alignment.json"),
            "--image_folder", str(data / "images"), "--tune_mm_mlp_adapter", "True", "--learning_rate", "2e-3",
            "--max_steps", str(steps), "--output_dir", str(out), *COMMON]


def test_stages_train_from_hub_ids_as_from_local_folders(offline_hub, tiny_model_dir, easy_vqa_dir, tmp_path):
    hub, local = tmp_path / "hub1", tmp_path / "local1"
    assert main(_stage1("acme/tiny-llm", "acme/tiny-clip", easy_vqa_dir, hub)) == 0
    assert main(_stage1(str(tiny_model_dir / "llm"), str(tiny_model_dir / "vision"), easy_vqa_dir, local)) == 0
    from_hub = load_file(str(hub / "mm_projector.safetensors"))
    from_local = load_file(str(local / "mm_projector.safetensors"))
    assert from_hub.keys() == from_local.keys()
    for key in from_hub:
        torch.testing.assert_close(from_hub[key], from_local[key], rtol=0, atol=0)

    # Stage 2 takes the stage-1 projector from a Hub repository; at lr 0 the saved model holds it unchanged.
    publish_to_hub_cache(offline_hub, hub, "acme/tiny-projector")
    s2 = tmp_path / "stage2"
    argv = ["--model_name_or_path", "acme/tiny-llm", "--vision_tower", "acme/tiny-clip",
            "--pretrain_mm_mlp_adapter", "acme/tiny-projector", "--data_path", str(easy_vqa_dir / "instruct.json"),
            "--image_folder", str(easy_vqa_dir / "images"), "--learning_rate", "0", "--max_steps", "1",
            "--output_dir", str(s2), *COMMON]
    assert main(argv) == 0
    model, _, _ = load_pretrained(str(s2), dtype=torch.float32)
    assert model.config.mm_vision_tower == "acme/tiny-clip"  # the id as given: portable across machines
    for key, value in from_hub.items():
        if key == "model.embed_tokens.weight":  # the <im_start>/<im_end> input rows stage 1 trained
            rows = model.get_input_embeddings().weight[delimiter_ids(model)]
            torch.testing.assert_close(rows, value, rtol=0, atol=0)
            continue
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)

    # Fine-tuning starts from an ExGra-Med checkpoint on the Hub.
    ft = tmp_path / "finetune"
    argv = ["--model_name_or_path", "acme/tiny-exgra", "--data_path", str(easy_vqa_dir / "train.json"),
            "--image_folder", str(easy_vqa_dir / "images"), "--learning_rate", "1e-3", "--max_steps", "1",
            "--output_dir", str(ft), *COMMON]
    assert main(argv) == 0
    assert (ft / "model.safetensors").is_file()


def test_stage1_with_biomedclip_through_hf_hub(offline_hub, easy_vqa_dir, tmp_path):
    out = tmp_path / "biomedclip"
    assert main(_stage1("acme/tiny-llm", "hf-hub:acme/tiny-biomedclip", easy_vqa_dir, out, steps=1)) == 0
    weights = load_file(str(out / "mm_projector.safetensors"))
    # The tiny open_clip trunk (timm test_vit) is 64 wide: the projector's input proves which tower was used.
    assert weights["mm_projector.0.weight"].shape[1] == 64
