"""scripts/extended_caption_generation.sh end to end against the fake server: extend, resume, merge."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "fake_openai", Path(__file__).parents[1] / "llm_client" / "fake_openai.py"
)
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "extended_caption_generation.sh"


def test_script_extends_merges_and_reruns_without_new_requests(tmp_path) -> None:
    records = [
        {
            "id": f"r{i}",
            "image": f"{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": f"A mass [[r{i}#1]]."},
            ],
        }
        for i in range(4)
    ]
    src = tmp_path / "instruct.json"
    src.write_text(json.dumps(records))
    with fake_openai.FakeOpenAI({"r2#1": ["500"]}) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENROUTER_")}
        env.update(
            {
                "PYTHON": sys.executable,
                "INPUT": str(src),
                "MODEL": "m",
                "OPENAI_API_KEY": "sk-script",
                "OPENAI_BASE_URL": server.base_url,
                "EXGRA_MED_API_BASE_DELAY": "0.01",
            }
        )
        for _ in range(2):  # the second run resumes from the finished output
            run = subprocess.run(
                ["bash", str(SCRIPT), "--concurrency", "2", "--no-progress"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, run.stderr[-2000:]
        assert dict(server.counts()) == {"r0#1": 1, "r1#1": 1, "r2#1": 2, "r3#1": 1}
    merged = json.loads((tmp_path / "instruct.long.json").read_text())
    assert [r["id"] for r in merged] == ["r0", "r1", "r2", "r3"]
    assert merged[2]["conversations"][1]["value"] == "A mass [[r2#1]]."
    assert merged[2]["conversations_long"][1]["value"] == "Extended answer for [[r2#1]]."
    assert (tmp_path / "instruct.extended.json").exists()


def test_script_reports_missing_input(tmp_path) -> None:
    env = {**os.environ, "INPUT": str(tmp_path / "nope.json")}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "nope.json not found" in run.stderr
