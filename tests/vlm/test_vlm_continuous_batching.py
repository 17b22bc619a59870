"""Continuous batching on every native family (Qwen2.5-VL's multimodal RoPE, Gemma 3's image attention,
LLaVA-OneVision's tiles): greedy answers of rows that join a running row equal the answers of single requests and
of static batching."""

from __future__ import annotations

import os

from exgra_med.model.auto import LoadOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine


def test_rows_joining_mid_flight_answer_as_single_requests(arch, tiny_vlm, easy_vqa_dir):
    folder = easy_vqa_dir / "images"
    images = [folder / name for name in sorted(os.listdir(folder))[:2]]
    engine = InferenceEngine.from_path(str(tiny_vlm(arch)), LoadOptions(device="cpu"))
    static = InferenceEngine(engine.backend, batching="static")
    cases = [([("human", "What color is the shape?")], images[0], GenerationSettings(max_new_tokens=5)),
             ([("human", "Is there a circle?")], None, GenerationSettings(max_new_tokens=7)),
             ([("human", "What shape is it?")], images[1], GenerationSettings(max_new_tokens=4))]
    long_settings = GenerationSettings(max_new_tokens=60, min_new_tokens=60)
    try:
        alone = [static.answer(*case) for case in cases]
        long_alone = static.submit([("human", "Describe the image.")], images[1], long_settings)
        list(long_alone.pieces())
        assert [engine.answer(*case) for case in cases] == alone

        long = engine.submit([("human", "Describe the image.")], images[1], long_settings)
        assert long.next_piece() is not None  # decoding: the others join its batch
        joined = [engine.submit(*case) for case in cases]
        assert ["".join(job.pieces()) for job in joined] == alone
        list(long.pieces())
        assert long.generated == long_alone.generated
    finally:
        engine.close()
        static.close()


def test_qwen_generation_config_penalty_applies_to_joining_rows(tiny_vlm, easy_vqa_dir, monkeypatch):
    """The model's own generation config (here a repetition penalty) applies as `generate` applies it, the prompt's
    tokens included, to rows that join mid-flight."""
    image = easy_vqa_dir / "images" / sorted(os.listdir(easy_vqa_dir / "images"))[0]
    engine = InferenceEngine.from_path(str(tiny_vlm("qwen2_5_vl")), LoadOptions(device="cpu"))
    static = InferenceEngine(engine.backend, batching="static")
    settings = GenerationSettings(max_new_tokens=10)
    cases = [([("human", "What color is the shape?")], image, settings), ([("human", "Is there a circle?")], None,
                                                                          settings)]
    try:
        plain = [static.answer(*case) for case in cases]
        monkeypatch.setattr(engine.backend.model.generation_config, "repetition_penalty", 3.0)
        alone = [static.answer(*case) for case in cases]
        assert alone != plain
        long = engine.submit([("human", "Describe the image.")], image, GenerationSettings(60, min_new_tokens=60))
        assert long.next_piece() is not None
        assert ["".join(job.pieces()) for job in [engine.submit(*case) for case in cases]] == alone
    finally:
        engine.close()
        static.close()
