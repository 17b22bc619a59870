"""Shared test setup: offline Hugging Face, no Gradio analytics, few threads, a tiny tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

torch.set_num_threads(2)

# A few sentences in the style of the demo data; the tokenizer also learns every template string.
TINY_CORPUS = [
    "Describe the image. A red circle. A blue rectangle. A green triangle.",
    "What color is the shape? What shape is in the image? Is there a circle in the image?",
    "Yes. No. yes no red green blue black gray teal brown yellow circle rectangle triangle",
    "The image shows a single yellow triangle on a plain background. Its colour is yellow.",
    "Is there evidence of an aortic aneurysm? The lesion is in the left lung. CT scan of the chest.",
]


@pytest.fixture(scope="session")
def word_tokenizer():
    """A small byte-level BPE tokenizer (with image tokens and `[PAD]`), built offline once per session.

    Shared by every test: do not add tokens to it; `copy.deepcopy` it first.
    """
    from exgra_med.model.tokenizer import build_word_tokenizer

    return build_word_tokenizer(TINY_CORPUS, vocab_size=800)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random ExGra-Med model (CLIP + LLaMA) written by `make_tiny_model`: OUT, OUT/llm, OUT/vision."""
    from exgra_med.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def easy_vqa_dir(tmp_path_factory):
    """A small easy-VQA preparation (40 images per split) shared by training and evaluation tests."""
    from exgra_med.data.prepare.easy_vqa import prepare

    out = tmp_path_factory.mktemp("easy_vqa") / "data"
    prepare(out, max_images=40, seed=0)
    return out


def write_bomb_png(path, width: int = 30000, height: int = 30000):
    """A tiny PNG whose header declares a `width` x `height` canvas (a decompression bomb); returns `path`."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def bomb_png(tmp_path):
    """Path of a 30000 x 30000 PNG header in a few hundred bytes."""
    return write_bomb_png(tmp_path / "bomb.png")
