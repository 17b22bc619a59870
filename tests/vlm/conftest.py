"""Tiny native VLMs (one per architecture, built once per session) and their stage-2 runs on easy-VQA."""

from __future__ import annotations

from pathlib import Path

import pytest

from exgra_med.model.native.tiny import ARCHES
from tests.vlm.runs import STAGE2_STEPS, train_args


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """`tiny_vlm(arch)`: the folder of a tiny random `arch` model with its processor (built on first use)."""
    from exgra_med.model.native.tiny import make_tiny_vlm

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_vlm(tmp_path_factory.mktemp(arch) / "model", arch, seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def stage2_run(tiny_vlm, easy_vqa_dir, tmp_path_factory):
    """`stage2_run(arch)`: the output folder of a 3-step stage-2 run with the alignment (run on first use)."""
    from exgra_med.train.main import main

    done: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in done:
            out = tmp_path_factory.mktemp(f"stage2_{arch}") / "out"
            argv = train_args(tiny_vlm(arch), easy_vqa_dir / "instruct.json", easy_vqa_dir / "images", out,
                              STAGE2_STEPS)
            assert main(argv) == 0
            done[arch] = out
        return done[arch]

    return get


@pytest.fixture(params=ARCHES)
def arch(request) -> str:
    return request.param
