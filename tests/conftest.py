"""Shared test setup: offline Hugging Face, no Gradio analytics, few threads, a tiny tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Under pytest-xdist each worker gets one core's worth of threads (two 2-thread torch processes on the 2-core machine
# slow each other down many times over: OpenMP threads spin on a busy core); the subprocesses a test starts inherit
# OMP_NUM_THREADS. Without xdist, OMP_NUM_THREADS (default 2) sets the threads of this process.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def is_distributed_module(path: str) -> bool:
    """Modules named test_*distributed.py hold the tests that start two training processes (torchrun ranks, nodes)."""
    return path.split("::", 1)[0].endswith("distributed.py")


def pytest_collection_modifyitems(config, items):
    """The distributed modules run first, then the modules that hold slow tests (otherwise in collection order):
    pytest-xdist's `--dist loadscope` hands out its units in this order, so the long end-to-end tests start early
    instead of finishing alone at the end while the other worker idles."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (not is_distributed_module(item.nodeid), item.path not in slow))


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is a dev dependency; without it the suite runs in one process
    pass
else:
    class DistributedTogetherScheduling(LoadScopeScheduling):
        """`--dist loadscope` (a module's tests stay on one worker, so its module fixtures are built once), except
        that the distributed modules form one unit: their tests run one after another on one worker, never two
        2-process runs at once. Side by side (four busy processes on two cores) gloo and DeepSpeed runs slowed each
        other about 5x (stage 1 under ZeRO-2: 13.5 s alone, 68-79 s beside another)."""

        def _split_scope(self, nodeid: str) -> str:
            return "distributed" if is_distributed_module(nodeid) else super()._split_scope(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        return DistributedTogetherScheduling(config, log) if config.getvalue("dist") == "loadscope" else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: for a torchrun rendezvous or a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The launch scripts default MASTER_PORT to fixed numbers: every test process (each xdist worker) and every test
# gets a port of its own, so torchrun runs side by side do not meet at one rendezvous.
os.environ["MASTER_PORT"] = str(free_port())


@pytest.fixture(autouse=True)
def _own_master_port(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def start_api_server(model, *flags: str, env: dict | None = None, drain: bool = False,
                     timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`exgra-med serve-api --model MODEL --port 0 FLAGS` in a real subprocess (offline, one thread, `env` added);
    returns the process and its base URL once it prints "serving model ... on URL". `drain` reads the rest of its
    output in a thread (a chatty server never blocks on a full pipe); otherwise the caller may read it. The caller
    stops the server."""
    cmd = [sys.executable, "-m", "exgra_med.cli", "serve-api", "--model", str(model), "--port", "0", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    timer = threading.Timer(timeout, proc.kill)  # a server that never prints its address ends the wait below
    timer.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving model"):
                url = line.split(" on ", 1)[1].strip()
                if drain:
                    threading.Thread(target=proc.stdout.read, daemon=True).start()
                return proc, url
    finally:
        timer.cancel()
    proc.kill()
    pytest.fail(f"serve-api did not start within {timeout:.0f} s:\n" + "".join(lines[-30:]))

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


@pytest.fixture(scope="session")
def stage1_projector(tiny_model_dir, easy_vqa_dir, tmp_path_factory):
    """A stage-1 run (2 steps, projector only, in process) on the tiny model and `easy_vqa_dir`: the projector the
    stage-2 tests start from. Shared: do not write into it."""
    from exgra_med.train.main import main

    out = tmp_path_factory.mktemp("stage1") / "stage1"
    assert main([
        "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--data_path", str(easy_vqa_dir / "alignment.json"), "--image_folder", str(easy_vqa_dir / "images"),
        "--tune_mm_mlp_adapter", "True", "--max_steps", "2", "--output_dir", str(out), "--report_to", "none",
        "--per_device_train_batch_size", "2", "--save_strategy", "no", "--use_cpu", "True",
    ]) == 0
    return out


def publish_to_hub_cache(cache: Path, folder: Path, repo_id: str, revision: str = "main") -> Path:
    """Place the files of `folder` in a Hugging Face cache in the standard layout (`models--owner--name/
    snapshots/<commit>/`, `refs/<revision>`), as `hf download` leaves it; returns the snapshot folder."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        if file.is_file():
            shutil.copy2(file, snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def hub_cache(tiny_model_dir, tmp_path_factory):
    """A local Hugging Face cache holding the tiny model as Hub repositories: `acme/tiny-exgra` (the assembled model),
    `acme/tiny-llm`, `acme/tiny-clip` and `acme/tiny-biomedclip` (an open_clip tower)."""
    from exgra_med.model.tiny import write_tiny_biomedclip

    cache = tmp_path_factory.mktemp("hf_cache") / "hub"
    publish_to_hub_cache(cache, tiny_model_dir, "acme/tiny-exgra")
    publish_to_hub_cache(cache, tiny_model_dir / "llm", "acme/tiny-llm")
    publish_to_hub_cache(cache, tiny_model_dir / "vision", "acme/tiny-clip")
    biomedclip = tmp_path_factory.mktemp("biomedclip")
    write_tiny_biomedclip(biomedclip, 64)
    publish_to_hub_cache(cache, biomedclip, "acme/tiny-biomedclip")
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """`hub_cache` as the Hugging Face cache, offline, for this process and the subprocesses it starts."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


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


def small_easy_vqa(src: Path, dst: Path, n: dict[str, int]) -> Path:
    """The first `n[split]` records of each split of the prepared easy-VQA `src`, its candidates and images (linked),
    in `dst`."""
    dst.mkdir()
    for split, count in n.items():
        (dst / f"{split}.json").write_text(json.dumps(json.loads((src / f"{split}.json").read_text())[:count]))
    (dst / "candidate.json").write_text((src / "candidate.json").read_text())
    (dst / "images").symlink_to(src / "images")
    return dst
