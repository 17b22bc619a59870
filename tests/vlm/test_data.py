"""Records through a native VLM's chat template and processor: messages, label mask, batches, multi-image records."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig

from exgra_med.constants import IGNORE_INDEX
from exgra_med.data.chat import (
    ChatEncoder,
    NativeCollator,
    NativeDataset,
    collate_encoded,
    record_messages,
    stop_strings,
)
from exgra_med.data.dataset import TokenizationMismatchError
from exgra_med.data.records import RecordError, load_records, validate_record

TURNS = [
    {"from": "human", "value": "What color is the shape?\n<image>"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "Is there a circle?"},
    {"from": "gpt", "value": "Yes"},
]
# The end-of-turn token each architecture's template closes an answer with (the model's end of sequence).
END_OF_TURN = {"qwen2_5_vl": "<|im_end|>", "gemma3": "<end_of_turn>", "llava_onevision": "<|im_end|>"}


def _encoder(folder, aspect="square") -> ChatEncoder:
    processor = AutoProcessor.from_pretrained(folder)
    return ChatEncoder(processor, stop_strings(processor, GenerationConfig.from_pretrained(folder)), aspect)


def test_record_messages_keep_the_order_of_text_and_images():
    turns = [{"from": "human", "value": "<image>\nFirst view, then <image> second. Compare."},
             {"from": "gpt", "value": " Same. "}]
    assert record_messages(turns) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First view, then"},
                                     {"type": "image"}, {"type": "text", "text": "second. Compare."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
    ]
    assert record_messages(TURNS[:2])[0]["content"] == [{"type": "text", "text": "What color is the shape?"},
                                                        {"type": "image"}]


def test_labels_are_the_answers_and_their_end_of_turn_token(arch, tiny_vlm):
    encoder = _encoder(tiny_vlm(arch))
    image = Image.new("RGB", (64, 48), (200, 20, 20))
    encoded = encoder.encode_training(record_messages(TURNS), [image], "test record")
    ids, labels = encoded.input_ids, encoded.labels
    # The ids are exactly the processor's encoding of the chat template's rendering.
    messages = record_messages(TURNS)
    text = encoder.processor.apply_chat_template(messages, tokenize=False)
    expected = encoder.processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
    assert torch.equal(ids, expected["input_ids"][0])
    eot = END_OF_TURN[arch]
    tokenizer = encoder.tokenizer
    targets = labels != IGNORE_INDEX
    assert tokenizer.decode(ids[targets]) == f"Red.{eot}Yes{eot}"
    assert torch.equal(labels[targets], ids[targets])
    # Two runs of targets (one per answer), each right after the template's assistant header.
    starts = [i for i in range(len(ids)) if targets[i] and (i == 0 or not targets[i - 1])]
    assert len(starts) == 2
    assert tokenizer.decode(ids[: starts[0]]).endswith(text.split("Red.")[0][-5:])
    assert encoded.n_images == 1 and encoded.image_inputs["pixel_values"].shape[0] >= 1


def test_a_template_that_rewrites_answers_is_refused(tiny_vlm):
    encoder = _encoder(tiny_vlm("qwen2_5_vl"))
    encoder.processor.chat_template = encoder.processor.chat_template.replace(
        "{{ content['text'] }}", "{{ content['text'] | upper }}")
    with pytest.raises(TokenizationMismatchError, match="changes the answers' text"):
        encoder.encode_training(record_messages(TURNS[:2]), [Image.new("RGB", (32, 32))], "rec")


def test_records_too_long_for_their_image_tokens_are_refused(tiny_vlm):
    encoder = _encoder(tiny_vlm("gemma3"))
    with pytest.raises(RecordError, match="image tokens reach beyond --model_max_length 8"):
        encoder.encode_training(record_messages(TURNS), [Image.new("RGB", (32, 32))], "rec", max_length=8)


def test_several_images_per_record_only_on_the_native_path(tmp_path):
    record = {"id": "r1", "image": ["a.png", "b.png"],
              "conversations": [{"from": "human", "value": "<image><image>Compare."}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(RecordError, match="r1.*lists 2 images.*transformers-native VLM"):
        validate_record(record, 0, "data.json")
    assert validate_record(record, 0, "data.json", multi_image=True)["image"] == ["a.png", "b.png"]
    bad = dict(record, image=["a.png", "b.png", "c.png"])
    with pytest.raises(RecordError, match=r"one <image> per listed image \(3\)"):
        validate_record(bad, 0, "data.json", multi_image=True)
    answer_image = dict(record, conversations=[{"from": "human", "value": "<image>Q"},
                                               {"from": "gpt", "value": "<image>"}])
    with pytest.raises(RecordError, match="gpt turns none"):
        validate_record(answer_image, 0, "data.json", multi_image=True)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record]))
    assert load_records(path, multi_image=True)[0]["image"] == ["a.png", "b.png"]


def test_batches_pad_ids_and_token_inputs_and_concatenate_images(tiny_vlm, easy_vqa_dir):
    encoder = _encoder(tiny_vlm("llava_onevision"))
    one = encoder.encode_prompt(record_messages(TURNS[:1]), [Image.new("RGB", (64, 48))])  # anyres: 5 tiles
    two = encoder.encode_prompt(record_messages([{"from": "human", "value": "<image><image>Q"}]),
                                [Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))])  # 1 tile each
    none = encoder.encode_prompt(record_messages([{"from": "human", "value": "Just text."}]), [])
    batch = collate_encoded([one, two, none], pad_id=0, padding_side="left")
    lengths = [len(e.input_ids) for e in (one, two, none)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert torch.equal(batch["input_ids"][2, -lengths[2]:], none.input_ids)  # left padded
    assert batch["pixel_values"].shape == (3, 5, 3, 16, 16)  # 1 + 2 images, tiles padded to 5
    assert torch.equal(batch["pixel_values"][1, 1:], torch.zeros(4, 3, 16, 16))
    assert batch["batch_num_images"].tolist() == [1, 2, 0] and batch["images_per_sample"] == [1, 2, 0]

    gemma = _encoder(tiny_vlm("gemma3"))
    items = NativeDataset(easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", gemma, alignment=True)
    collated = NativeCollator(gemma.tokenizer.pad_token_id)([items[0], items[1]])
    assert collated["token_type_ids"].shape == collated["input_ids"].shape  # Gemma's image-token mask, padded
    assert collated["token_type_ids"].sum().item() == 2 * 16  # 16 image tokens per image
    assert collated["response_ids"].shape[0] == 2 and collated["extended_mask"].shape == collated["extended_ids"].shape


def test_tiny_qwen_with_finer_patches_keeps_four_image_tokens_and_runs(tmp_path):
    """`make-tiny-model --arch qwen2_5_vl --patch-size 7 --merge-size 4`: a 64 px image is still
    4 image tokens, now from an 8 x 8 grid of patches, and the model runs on it; other architectures refuse them."""
    from transformers import AutoModelForImageTextToText

    from exgra_med.model.tiny import main

    out = tmp_path / "qwen"
    assert main(["--arch", "qwen2_5_vl", "--out", str(out), "--patch-size", "7", "--merge-size", "4"]) == 0
    encoded = _encoder(out).encode_prompt([{"role": "user", "content": [{"type": "image"}]}],
                                          [Image.new("RGB", (64, 64), (200, 30, 30))])
    assert encoded.image_inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert (model.config.vision_config.patch_size, model.config.vision_config.spatial_merge_size) == (7, 4)
    features = model.get_image_features(encoded.image_inputs["pixel_values"], encoded.image_inputs["image_grid_thw"])
    assert [f.shape for f in features.pooler_output] == [torch.Size([4, model.config.text_config.hidden_size])]
    with pytest.raises(ValueError, match="qwen2_5_vl only"):
        main(["--arch", "gemma3", "--out", str(tmp_path / "gemma"), "--merge-size", "4"])
    with pytest.raises(ValueError, match="not of gemma3"):
        main(["--arch", "gemma3", "--out", str(tmp_path / "gemma"), "--patch-size", "7"])


def test_tiny_onevision_tiles_set_its_image_tokens_and_it_runs(tmp_path, tiny_vlm):
    """`make-tiny-model --arch llava_onevision --image-size 32 --patch-size 8 --anyres-grid 1`: a 64 px image is the
    whole image plus one 32 px tile, 16 tokens each and a newline per tile row (36), where the default 16 px tiles
    up to 2 x 2 give 16 + 64 + 8 (88); the model runs on it; the other architectures refuse the tile flags."""
    from transformers import AutoModelForImageTextToText

    from exgra_med.model.tiny import main

    image = [Image.new("RGB", (64, 64), (200, 30, 30))]
    messages = [{"role": "user", "content": [{"type": "image"}]}]

    def image_tokens(folder):
        encoder = _encoder(folder)
        encoded = encoder.encode_prompt(messages, image)
        token = encoder.processor.tokenizer.convert_tokens_to_ids("<image>")
        return encoded, int((encoded.input_ids == token).sum())

    default, n_default = image_tokens(tiny_vlm("llava_onevision"))
    assert default.image_inputs["pixel_values"].shape == (1, 5, 3, 16, 16) and n_default == 16 + 64 + 8
    out = tmp_path / "onevision"
    assert main(["--arch", "llava_onevision", "--out", str(out), "--image-size", "32", "--patch-size", "8",
                 "--anyres-grid", "1"]) == 0
    encoded, n = image_tokens(out)
    assert encoded.image_inputs["pixel_values"].shape == (1, 2, 3, 32, 32) and n == 16 + 16 + 4
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.image_grid_pinpoints == [[32, 32]] and model.config.vision_config.patch_size == 8
    with torch.no_grad():
        logits = model(input_ids=encoded.input_ids[None], **encoded.image_inputs).logits
    assert logits.shape[:2] == (1, len(encoded.input_ids)) and torch.isfinite(logits).all()
    for arch, flags in (("qwen2_5_vl", ["--anyres-grid", "1"]), ("gemma3", ["--image-size", "64"])):
        with pytest.raises(ValueError, match="llava_onevision only"):
            main(["--arch", arch, "--out", str(tmp_path / arch), *flags])
    with pytest.raises(ValueError, match="multiple of --patch-size"):
        main(["--arch", "llava_onevision", "--out", str(tmp_path / "bad"), "--image-size", "30", "--patch-size", "8"])
