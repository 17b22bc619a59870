"""Everything `exgra-med train` can check is checked before a model is loaded: records, the image folder and every
image's header (missing files, decompression bombs), with the file and record named and no checkpoint written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exgra_med.data.images import ImageLoadError, ImageTooLargeError, check_record_images, image_header, load_image
from exgra_med.data.records import RecordError
from exgra_med.errors import UserError
from exgra_med.train import main as train_main
from exgra_med.train.inputs import DROPPED_RECORDS_FILE, validate_inputs
from exgra_med.train.llava import LlavaTraining
from tests.data.test_image_check import write_truncated_png


class ModelLoaded(Exception):
    """Raised by the patched model builder: validation let the run reach model loading."""


@pytest.fixture
def no_model(monkeypatch):
    def build(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(LlavaTraining, "build", build)


def _data(easy_vqa_dir: Path, tmp_path: Path, n: int = 40) -> tuple[Path, Path, list[dict]]:
    images = tmp_path / "images"
    shutil.copytree(easy_vqa_dir / "images", images)
    records = json.loads((easy_vqa_dir / "instruct.json").read_text())[:n]
    return images, tmp_path / "records.json", records


def _argv(tiny_model_dir: Path, data: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
            "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--save_steps", "1", "--report_to", "none", "--use_cpu", "True",
            *extra]


def test_missing_image_in_the_last_record_fails_before_loading(tiny_model_dir, easy_vqa_dir, tmp_path, no_model):
    images, data, records = _data(easy_vqa_dir, tmp_path)
    records[-1] = {**records[-1], "image": "no-such-image.png"}
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    with pytest.raises(ImageLoadError) as e:
        train_main.main(_argv(tiny_model_dir, data, images, out))
    message = str(e.value)
    assert str(data) in message and f"record {records[-1]['id']!r}" in message and "no-such-image.png" in message
    assert not list(out.glob("checkpoint-*"))
    # --skip_image_check defers image reading to the batches: validation passes and the model is loaded.
    with pytest.raises(ModelLoaded):
        train_main.main(_argv(tiny_model_dir, data, images, out, "--skip_image_check", "True"))


def test_decompression_bomb_named_before_loading(tiny_model_dir, easy_vqa_dir, tmp_path, bomb_png, no_model):
    images, data, records = _data(easy_vqa_dir, tmp_path, n=5)
    shutil.copy(bomb_png, images / "bomb.png")
    records[2] = {**records[2], "image": "bomb.png"}
    data.write_text(json.dumps(records))
    with pytest.raises(ImageTooLargeError, match=f"record {records[2]['id']!r}: field 'image': image too large"):
        train_main.main(_argv(tiny_model_dir, data, images, tmp_path / "run"))


def test_bad_folders_and_empty_data_fail_before_loading(tiny_model_dir, easy_vqa_dir, tmp_path, no_model):
    images, data, records = _data(easy_vqa_dir, tmp_path, n=3)
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--image_folder .*missing: no such folder"):
        train_main.main(_argv(tiny_model_dir, data, tmp_path / "missing", out))
    with pytest.raises(UserError, match="--model_name_or_path /nonexistent: no such file or folder"):
        train_main.main(_argv(tiny_model_dir, data, images, out)[:0] + [
            "--model_name_or_path", "/nonexistent", "--vision_tower", str(tiny_model_dir / "vision"),
            "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out)])
    data.write_text("[]")
    with pytest.raises(RecordError, match="holds no records"):
        train_main.main(_argv(tiny_model_dir, data, images, out))
    data.write_text('[{"id": 1, "conversations": [}]')
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        train_main.main(_argv(tiny_model_dir, data, images, out))
    data.write_text(json.dumps(records))
    with pytest.raises(ModelLoaded):  # and valid inputs go on to the model
        train_main.main(_argv(tiny_model_dir, data, images, out))


def test_output_dir_that_holds_a_model_or_an_input_is_refused_before_anything_is_written(
        tiny_model_dir, easy_vqa_dir, tmp_path, no_model):
    images, data, records = _data(easy_vqa_dir, tmp_path, n=3)
    data.write_text(json.dumps(records))
    llm = tiny_model_dir / "llm"
    before = sorted(p.name for p in llm.iterdir())
    with pytest.raises(UserError, match="is the --model_name_or_path folder; training would write over its input"):
        train_main.main(_argv(tiny_model_dir, data, images, llm))
    assert sorted(p.name for p in llm.iterdir()) == before  # not even the resolved recipe was written
    with pytest.raises(UserError, match="is the --vision_tower folder"):
        train_main.main(_argv(tiny_model_dir, data, images, tiny_model_dir / "vision"))

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"already holds a trained model \(config.json\); .*--resume_from_checkpoint"):
        train_main.main(_argv(tiny_model_dir, data, images, finished))
    assert sorted(p.name for p in finished.iterdir()) == ["config.json"]
    with pytest.raises(UserError, match="holds a trained model .* and no checkpoint-N to resume from"):
        train_main.main(_argv(tiny_model_dir, data, images, finished, "--resume_from_checkpoint", "auto"))
    (finished / "checkpoint-2").mkdir()
    (finished / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(ModelLoaded):  # resuming the run's own checkpoint goes on
        train_main.main(_argv(tiny_model_dir, data, images, finished, "--resume_from_checkpoint", "auto"))
    with pytest.raises(ModelLoaded):  # and so does asking to replace it
        train_main.main(_argv(tiny_model_dir, data, images, tmp_path / "finished", "--overwrite_output_dir", "True"))


def test_image_header_checks(tmp_path, bomb_png):
    from PIL import Image

    png = tmp_path / "ok.png"
    Image.new("RGB", (20, 10)).save(png)
    assert image_header(png) == (20, 10, "PNG")
    with pytest.raises(ImageTooLargeError, match="20x10 pixels > 100"):
        image_header(png, max_pixels=100)
    with pytest.raises(ImageTooLargeError, match=r"bomb.png declares 900000000 pixels > \d+$"):
        image_header(bomb_png)
    # The message states the limit in force (the configured one), not PIL's internal one.
    with pytest.raises(ImageTooLargeError, match=r"bomb.png declares 900000000 pixels > 1000$"):
        image_header(bomb_png, max_pixels=1000)
    with pytest.raises(ImageTooLargeError, match="bomb.png"):  # decoding refuses it too (it is not a PIL traceback)
        load_image(bomb_png)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match="cannot read image header .*text.png"):
        image_header(tmp_path / "text.png")
    records = [{"id": "a", "image": "ok.png"}, {"id": "b"}, {"id": "c", "image": "text.png"}]
    with pytest.raises(ImageLoadError, match="src.json: record 'c': field 'image'"):
        check_record_images(records, tmp_path, "src.json")
    assert check_record_images(records[:2], tmp_path, "src.json") == 1


def test_a_truncated_png_fails_before_loading_or_its_record_is_dropped(
        tiny_model_dir, easy_vqa_dir, tmp_path, no_model, caplog):
    images, data, records = _data(easy_vqa_dir, tmp_path, n=5)
    write_truncated_png(images / "cut.png")
    records[2] = {**records[2], "image": "cut.png"}
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    with pytest.raises(ImageLoadError, match=f"{data}: record {records[2]['id']!r}: field 'image': cannot decode "
                                             r"image .*cut.png.*truncated"):
        train_main.main(_argv(tiny_model_dir, data, images, out))
    with pytest.raises(ModelLoaded):  # the header scan alone lets it through
        train_main.main(_argv(tiny_model_dir, data, images, out, "--image_check", "header"))
    with caplog.at_level("WARNING"), pytest.raises(ModelLoaded):  # dropped and named; the others go on
        train_main.main(_argv(tiny_model_dir, data, images, out, "--drop_bad_records", "True"))
    assert f"record {records[2]['id']!r}: field 'image': cannot decode image" in caplog.text
    assert "dropped 1 of 5 records" in caplog.text

    # The list of dropped records is written to the output folder.
    model_args, data_args, _ = train_main.parse_args(
        _argv(tiny_model_dir, data, images, out, "--drop_bad_records", "True"))
    kept = validate_inputs(model_args, data_args, alignment=False, output_dir=out)
    assert [r["id"] for r in kept] == [r["id"] for i, r in enumerate(records) if i != 2]
    listed = [json.loads(line) for line in (out / DROPPED_RECORDS_FILE).read_text().splitlines()]
    assert [(d["record"], d["field"], d["file"]) for d in listed] == [(records[2]["id"], "image", "cut.png")]
    assert "truncated" in listed[0]["reason"] and listed[0]["data_path"] == str(data)

    # Every record dropped: nothing to train on.
    data.write_text(json.dumps([{**r, "image": "cut.png"} for r in records]))
    with pytest.raises(UserError, match=r"--drop_bad_records: all 5 records .* dropped; nothing to train on"):
        train_main.main(_argv(tiny_model_dir, data, images, out, "--drop_bad_records", "True"))


def test_vision_tower_and_projector_are_checked_before_loading(
        tiny_model_dir, easy_vqa_dir, tmp_path, no_model, offline_hub):
    images, data, records = _data(easy_vqa_dir, tmp_path, n=3)
    data.write_text(json.dumps(records))
    out = tmp_path / "run"

    def run(*flags: str) -> None:  # a repeated flag's last value wins
        train_main.main(_argv(tiny_model_dir, data, images, out, *flags))

    text_model = tmp_path / "text_tower"
    text_model.mkdir()
    shutil.copy(tiny_model_dir / "llm" / "config.json", text_model / "config.json")
    with pytest.raises(UserError, match=r"--vision_tower .*text_tower: model_type 'llama' is not a vision tower"):
        run("--vision_tower", str(text_model))
    with pytest.raises(UserError, match="--vision_tower acme/no-such-tower: .*not in the Hugging Face cache"):
        run("--vision_tower", "acme/no-such-tower")
    with pytest.raises(UserError, match="--vision_tower hf-hub:acme/no-such-tower: .*not in the Hugging Face cache"):
        run("--vision_tower", "hf-hub:acme/no-such-tower")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"--vision_tower local-dir:.*empty: no open_clip_config.json"):
        run("--vision_tower", f"local-dir:{empty}")
    with pytest.raises(UserError, match="--pretrain_mm_mlp_adapter /nonexistent/stage1: no such file or folder"):
        run("--pretrain_mm_mlp_adapter", "/nonexistent/stage1")
    with pytest.raises(UserError, match=r"--pretrain_mm_mlp_adapter .*empty: holds no mm_projector.safetensors"):
        run("--pretrain_mm_mlp_adapter", str(empty))
    with pytest.raises(UserError, match="--pretrain_mm_mlp_adapter runs/stage1: .*not in the Hugging Face cache"):
        run("--pretrain_mm_mlp_adapter", "runs/stage1")
    for tower in ("acme/tiny-clip", "hf-hub:acme/tiny-biomedclip", str(tiny_model_dir / "vision")):
        with pytest.raises(ModelLoaded):  # cached Hub towers and local folders go on to the model
            run("--vision_tower", tower)
